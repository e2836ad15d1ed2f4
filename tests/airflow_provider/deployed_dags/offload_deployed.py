"""DAGs for tests/airflow_provider/test_deployment.py: what a deferrable task meets in a real deployment."""

import os
from datetime import timedelta

from airflow.sdk import dag

from airflow_offload import OffloadOperator

SECRET = os.environ.get("OFFLOAD_TEST_SECRET", "unset")


@dag(dag_id="offload_live_logs", schedule=None, catchup=False)
def live_logs():
    OffloadOperator(
        task_id="ticks",
        deferrable=True,
        poll_interval=2,
        command=["sh", "-c", "for i in $(seq 1 30); do echo tick $i; sleep 1; done; echo all done"],
    )


@dag(dag_id="offload_secret", schedule=None, catchup=False)
def secret():
    for deferrable in (False, True):
        OffloadOperator(
            task_id=f"prints_{'deferred' if deferrable else 'sync'}",
            deferrable=deferrable,
            secrets={"API_KEY": SECRET},
            command=["sh", "-c", "sleep 3; echo the key is $API_KEY"],
        )


@dag(dag_id="offload_templated", schedule=None, catchup=False, params={"gpus": 2, "partition": "gpu"})
def templated():
    OffloadOperator(
        task_id="gpus",
        gpus="{{ params.gpus }}",
        partition="{{ params.partition }}",
        command=["sh", "-c", "echo GPUs $CUDA_VISIBLE_DEVICES"],
    )


@dag(dag_id="offload_skip", schedule=None, catchup=False)
def skip():
    OffloadOperator(task_id="nothing_to_do", skip_on_exit_code=99, command=["sh", "-c", "echo nothing; exit 99"])


@dag(dag_id="offload_timeout", schedule=None, catchup=False)
def timeout():
    OffloadOperator(
        task_id="too_long", deferrable=True, execution_timeout=timedelta(seconds=20), command=["sleep", "300"]
    )


@dag(dag_id="offload_ssh_connection", schedule=None, catchup=False)
def ssh_connection():
    OffloadOperator(
        task_id="via_ssh",
        offload_conn_id="hpc_ssh",
        site="testsite",
        deferrable=True,
        command=["sh", "-c", "echo reached through an ssh connection as $(whoami)"],
    )


def survives_triggerer(site: str):
    """One per site of the test site (its SLURM cluster, its Grid Engine cell): the triggerer is killed mid-job. The
    task's id (hence its job's name) names the site, so each site's test counts its own jobs."""

    @dag(dag_id=f"offload_survives_triggerer_{site}", schedule=None, catchup=False)
    def on_site():
        OffloadOperator(
            task_id=f"long_{site}", site=site, deferrable=True, command=["sh", "-c", "sleep 40; echo done once"]
        )

    return on_site()


for factory in (live_logs, secret, templated, skip, timeout, ssh_connection):
    globals()[factory.__name__ + "_dag"] = factory()
for site in ("testsite", "gridengine"):
    globals()[f"survives_triggerer_{site}_dag"] = survives_triggerer(site)
