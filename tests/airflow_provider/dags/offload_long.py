"""A task whose job runs for a while, for the kill and reattach tests in tests/airflow_provider."""

import os

from airflow.sdk import dag

from airflow_offload import OffloadOperator


@dag(dag_id="offload_long", schedule=None, catchup=False)
def offload_long():
    OffloadOperator(task_id="long_job", command=["sh", "-c", os.environ.get("LONG_JOB", "sleep 8; echo finished")],
                    deferrable=os.environ.get("LONG_DEFERRABLE") == "1")  # fmt: skip


long_dag = offload_long()
