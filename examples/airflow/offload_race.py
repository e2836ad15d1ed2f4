"""An Airflow task raced over several HPC sites: its job runs on whichever site starts it first, exactly once.

The worker submits one attempt to each of the two best sites (free GPUs first, then the schedulers' plans) and
defers; the triggerer claims the first attempt that starts and cancels the other before its payload could run.
Name the sites (a group of the offload config, or "a,b"):

    OFFLOAD_SITES=@slurms airflow dags test offload_race    # the test site's two SLURM clusters
"""

from __future__ import annotations

import os

from airflow.sdk import dag

from airflow_offload import OffloadOperator

SITES = os.environ.get("OFFLOAD_SITES", "@gpu")


@dag(dag_id="offload_race", schedule=None, catchup=False, tags=["offload", "example"])
def offload_race():
    OffloadOperator(
        task_id="raced",
        site=SITES,
        policy="race",
        width=2,
        gpus=1,
        walltime="00:10:00",
        deferrable=True,
        command=["sh", "-c", "echo ran {{ run_id }} on $(hostname)"],
    )


example_dag = offload_race()
