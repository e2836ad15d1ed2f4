"""User story 1: "track the training, send it to a central service, read it from a CLI or a browser".

Creates the MLflow run here, before the job starts (so its id is known at once, as ncsa/mlflow-slurm does),
then runs train.py on the site. Compute nodes usually cannot reach your MLflow server, so the job *reaches* it
through offload's connection: inside the job ``MLFLOW_TRACKING_URI`` points at a relay on the node's loopback,
and the traffic leaves from this machine (your network, VPN and DNS). Credentials travel as secrets: they never
reach a batch script, a log or a file anyone else can read.

    python examples/mlflow_training/submit.py --tracking-uri http://mlflow.example.org:5000
    python examples/mlflow_training/submit.py --site testsite --gpus 2 --tracking-uri http://127.0.0.1:5000

Then open the run in MLflow's UI (the URL printed at the end), or read it with ``mlflow runs describe``.
Needs ``mlflow-skinny`` here (``pip install 'offload[mlflow]'``) and ``numpy`` + ``mlflow-skinny`` where the
job runs (the image; or this Python on the local site).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

import offload

HERE = Path(__file__).parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default=None, help="site profile (default: $OFFLOAD_SITE, else 'local')")
    parser.add_argument("--gpus", type=int, default=0)
    parser.add_argument("--image", default=None)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), required=False)
    parser.add_argument("--experiment", default="offload-example")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    if not args.tracking_uri:
        parser.error("give --tracking-uri (or set MLFLOW_TRACKING_URI) of an MLflow server")

    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(args.experiment)
    run = client.create_run(experiment_id, run_name=f"offload-{args.site or 'local'}")

    secrets = {}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        if os.environ.get(name):
            secrets[name] = os.environ[name]
    site = offload.load_site(args.site)
    spec = offload.JobSpec(
        [site.python, "train.py", "--epochs", str(args.epochs)],
        image=args.image,
        resources=offload.Resources(gpus=args.gpus, walltime="00:30:00"),
        env={"MLFLOW_RUN_ID": run.info.run_id, "MLFLOW_EXPERIMENT_ID": experiment_id, "GIT_PYTHON_REFRESH": "quiet"},
        secrets=secrets,
        reach={"MLFLOW_TRACKING_URI": args.tracking_uri},
        files={"train.py": (HERE / "train.py").read_bytes()},
        name="mlflow-train",
    )
    job = site.submit(spec)
    print(f"run {run.info.run_id}: job {job.id} on {site.name}", file=sys.stderr)
    for line in job.logs(follow=True):
        print(line)
    status = job.wait()
    print(f"job {job.id}: {status.describe()}", file=sys.stderr)
    if status.state is not offload.JobState.COMPLETED and client.get_run(run.info.run_id).info.status == "RUNNING":
        client.set_terminated(run.info.run_id, "FAILED")  # the job never ended the run: say it failed
    print(f"MLflow UI: {args.tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run.info.run_id}")
    return status.exit_code or 0


if __name__ == "__main__":
    sys.exit(main())
