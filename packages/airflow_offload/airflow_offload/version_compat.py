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

AIRFLOW_V_3_3_PLUS = Version(Version(AIRFLOW_VERSION).base_version) >= Version("3.3.0")
if not Version(AIRFLOW_VERSION).major >= 3:  # pragma: no cover
    raise ImportError(f"airflow_offload needs Airflow 3 (found {AIRFLOW_VERSION}): pip install 'offload[airflow]'")

__all__ = [
    "AIRFLOW_V_3_3_PLUS",
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
