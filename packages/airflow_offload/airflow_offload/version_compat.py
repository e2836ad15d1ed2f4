"""The one place that knows Airflow versions: everything the provider imports from Airflow comes from here.

Only Airflow 3's public Task SDK (``airflow.sdk``) is used where it has the name; triggers still live in
``airflow.triggers.base`` in 3.3. Nothing Airflow marks private (``:meta private:``): a failed deferral is
known by the public exceptions ``BaseOperator.resume_execution`` raises for it, as Airflow's own sensors do.
"""

from __future__ import annotations

from airflow import __version__ as AIRFLOW_VERSION
from airflow.sdk import BaseHook, BaseOperator, conf
from airflow.sdk.bases.decorator import DecoratedOperator, task_decorator_factory
from airflow.sdk.exceptions import AirflowException, AirflowSkipException, TaskDeferralError, TaskDeferralTimeout
from airflow.sdk.log import mask_secret
from airflow.triggers.base import BaseTrigger, TriggerEvent
from packaging.version import Version

# The oldest Airflow the provider works with: the ``airflow`` extra's ``apache-airflow>=`` (no upper cap, as
# Airflow's providers declare theirs), checked here too for an Airflow installed some other way. 3.3: the
# triggerer calls a trigger's ``on_kill`` (a killed deferred task cancels its job), ``airflow.sdk.conf``.
MIN_AIRFLOW_VERSION = "3.3"
if Version(Version(AIRFLOW_VERSION).base_version) < Version(MIN_AIRFLOW_VERSION):  # pragma: no cover
    raise ImportError(
        f"airflow_offload needs Airflow {MIN_AIRFLOW_VERSION} or later (found {AIRFLOW_VERSION}): "
        "pip install 'offload[airflow]'"
    )

__all__ = [
    "MIN_AIRFLOW_VERSION",
    "AirflowException",
    "AirflowSkipException",
    "BaseHook",
    "BaseOperator",
    "BaseTrigger",
    "DecoratedOperator",
    "TaskDeferralError",
    "TaskDeferralTimeout",
    "TriggerEvent",
    "conf",
    "mask_secret",
    "task_decorator_factory",
]
