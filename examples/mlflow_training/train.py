"""The training payload: a logistic regression in NumPy on generated data, tracked in MLflow.

It runs inside the job's container and needs only ``numpy`` and ``mlflow-skinny``. MLflow finds its server and
credentials in the environment (``MLFLOW_TRACKING_URI``, ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, passed by
offload as secrets), and the run in ``MLFLOW_RUN_ID`` when the submitter created it ahead of time.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import mlflow
import numpy as np


def data(n: int, features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features))
    true_w = rng.normal(size=features)
    y = (x @ true_w + 0.3 * rng.normal(size=n) > 0).astype(float)
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4000)
    args = parser.parse_args()

    x, y = data(args.samples, args.features, seed=7)
    split = int(0.8 * len(y))
    w = np.zeros(args.features)
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    with mlflow.start_run(run_name=os.environ.get("MLFLOW_RUN_NAME")) as run:
        job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("JOB_ID", "local")  # SLURM's, Grid Engine's
        mlflow.log_params({**vars(args), "gpus": gpus or "none", "job_id": job_id})
        for epoch in range(args.epochs):
            p = 1 / (1 + np.exp(-(x[:split] @ w)))
            loss = float(-np.mean(y[:split] * np.log(p + 1e-9) + (1 - y[:split]) * np.log(1 - p + 1e-9)))
            w -= args.lr * x[:split].T @ (p - y[:split]) / split
            accuracy = float(np.mean(((x[split:] @ w) > 0) == y[split:]))
            mlflow.log_metrics({"loss": loss, "val_accuracy": accuracy}, step=epoch)
            print(f"epoch {epoch:3d}  loss {loss:.4f}  val_accuracy {accuracy:.3f}", flush=True)
        model = Path("model")
        model.mkdir(exist_ok=True)
        np.savez(model / "weights.npz", w=w)
        (model / "model.json").write_text(json.dumps({"kind": "logistic-regression", "features": args.features}))
        mlflow.log_artifacts(str(model), artifact_path="model")
        print(f"run {run.info.run_id} done; final val_accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
