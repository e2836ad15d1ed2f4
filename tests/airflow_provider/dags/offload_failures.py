"""Tasks that fail on the site, for tests/airflow_provider: a non-zero exit, and an exception in @task.offload."""

from airflow.sdk import dag, task

from airflow_offload import OffloadOperator


@dag(dag_id="offload_failures", schedule=None, catchup=False)
def offload_failures():
    OffloadOperator(task_id="exits_3", command=["sh", "-c", "echo 'first line'; echo 'the error is here' >&2; exit 3"])

    @task.offload
    def raises() -> None:
        raise ValueError("bad input on the site")

    raises()


failures_dag = offload_failures()
