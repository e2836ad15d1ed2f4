"""airflow_offload: an Airflow 3 provider that runs tasks as containerised SLURM jobs on HPC sites.

from airflow_offload import OffloadOperator
train = OffloadOperator(task_id="train", site="leonardo", image="docker://me/train:1",
                        command=["python3", "train.py"], gpus=4, deferrable=True)

@task.offload(site="leonardo", image="docker://me/analysis:1", gpus=1)
def analyse(x): ...
"""

# First, so that Airflow's provider discovery (which the import below may start) finds it.
from airflow_offload.get_provider_info import get_provider_info

try:
    import airflow  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"airflow_offload needs Airflow 3: pip install 'offload[airflow]' ({exc})") from None

__all__ = ["OffloadHook", "OffloadJobTrigger", "OffloadOperator", "get_provider_info", "offload_task"]


def __getattr__(name: str):  # the provider's classes load on first use, not when Airflow reads its metadata
    if name == "OffloadHook":
        from airflow_offload.hooks.offload import OffloadHook

        return OffloadHook
    if name == "OffloadOperator":
        from airflow_offload.operators.offload import OffloadOperator

        return OffloadOperator
    if name == "OffloadJobTrigger":
        from airflow_offload.triggers.offload import OffloadJobTrigger

        return OffloadJobTrigger
    if name == "offload_task":
        from airflow_offload.decorators.offload import offload_task

        return offload_task
    raise AttributeError(name)
