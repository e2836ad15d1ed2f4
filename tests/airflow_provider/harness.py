"""Run one DAG with ``dag.test()`` in this process and print what happened as JSON on the last line.

    python harness.py DAG_FILE [LOGICAL_DATE]

A fixed logical date also fixes the run id, so a second run is the same task instances again (a retry).
"""

import datetime
import importlib.util
import json
import sys

from airflow.sdk.definitions.dag import DAG


def main() -> None:
    path = sys.argv[1]
    when = datetime.datetime.fromisoformat(sys.argv[2] if len(sys.argv) > 2 else "2026-01-01T00:00:00+00:00")
    spec = importlib.util.spec_from_file_location("dag_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = next(v for v in vars(module).values() if isinstance(v, DAG))
    run = dag.test(logical_date=when, run_after=when)

    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.run_id == run.run_id).all()
        states = {f"{ti.task_id}[{ti.map_index}]": str(ti.state) for ti in tis}
        xcoms: dict[str, dict] = {}
        for x in session.query(XComModel).filter(XComModel.run_id == run.run_id).all():
            xcoms.setdefault(f"{x.task_id}[{x.map_index}]", {})[x.key] = XComModel.deserialize_value(x)
    print("HARNESS " + json.dumps({"run_id": run.run_id, "state": str(run.state), "tasks": states, "xcoms": xcoms},
                                  default=str))  # fmt: skip


if __name__ == "__main__":
    main()
