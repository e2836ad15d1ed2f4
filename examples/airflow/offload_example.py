"""User story 3 for Airflow: a DAG whose heavy steps run as containerised SLURM jobs on an HPC site.

It chains a synchronous OffloadOperator, a deferrable one (no worker slot held while the job queues), and
@task.offload functions, one of them mapped over 10 inputs. It runs on this machine (the local site) as it
is, and on a site by naming it:

    airflow dags test offload_example                          # the local site
    OFFLOAD_SITE=testsite airflow dags test offload_example    # SLURM over SSH, in containers
"""

from __future__ import annotations

import os

from airflow.sdk import dag, task

from airflow_offload import OffloadOperator

SITE = os.environ.get("OFFLOAD_SITE")  # None: $OFFLOAD_SITE, the offload config's default, else "local"


@dag(dag_id="offload_example", schedule=None, catchup=False, tags=["offload", "example"])
def offload_example():
    prepare = OffloadOperator(
        task_id="prepare",
        site=SITE,
        command=[
            "python3",
            "-c",
            "import platform; print('prepared with Python', platform.python_version()); print(10)",
        ],
    )
    train = OffloadOperator(
        task_id="train",
        site=SITE,
        gpus=2,
        walltime="00:10:00",
        deferrable=True,
        command=[
            "python3",
            "-c",
            "import os; print('training on GPUs', os.environ.get('CUDA_VISIBLE_DEVICES', 'none'))",
        ],
    )

    @task.offload(site=SITE)
    def square(x: int) -> int:
        return x * x

    @task.offload(site=SITE)
    def total(values: list[int]) -> int:
        return sum(values)

    squares = square.expand(x=list(range(10)))
    prepare >> train >> squares
    total(squares)


example_dag = offload_example()
