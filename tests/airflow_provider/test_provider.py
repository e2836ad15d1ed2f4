"""The provider's metadata, serialisation and templating, in a real Airflow 3.3 (no site needed)."""

import json
import os
from pathlib import Path

import jsonschema
import pytest

from airflow_offload import OffloadJobTrigger, OffloadOperator, get_provider_info
from airflow_offload.hooks.offload import site_config


def test_provider_info_validates_against_airflows_schema():
    import airflow

    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    jsonschema.validate(get_provider_info(), schema)


def test_airflow_discovers_the_hook_the_connection_form_and_the_decorator():
    from airflow.providers_manager import ProvidersManager
    from airflow.sdk import task

    manager = ProvidersManager()
    assert manager.hooks["offload"].hook_class_name == "airflow_offload.hooks.offload.OffloadHook"
    assert "extra__offload__host_key" in manager.connection_form_widgets
    assert manager.field_behaviours["offload"]["relabeling"]["host"] == "Login node"
    assert task.offload.__name__ == "offload_task"


def test_trigger_serialisation_round_trips():
    trigger = OffloadJobTrigger(job_id="12_3", jobdir="/home/u/offload/jobs/x", index=3, site="testsite",
                                poll_interval=5.0)  # fmt: skip
    path, kwargs = trigger.serialize()
    module, _, name = path.rpartition(".")
    cls = getattr(__import__(module, fromlist=[name]), name)
    again = cls(**json.loads(json.dumps(kwargs)))
    assert again.serialize() == (path, kwargs)


def test_templated_fields_render():
    op = OffloadOperator(task_id="t", command=["echo", "{{ ds }}", "{{ params.n }}"], env={"DAY": "{{ ds }}"},
                         image="docker://me/img:{{ params.n }}")  # fmt: skip
    context = {"ds": "2026-01-01", "params": {"n": 7}}
    op.render_template_fields(context)
    assert op.command == ["echo", "2026-01-01", "7"]
    assert op.env == {"DAY": "2026-01-01"}
    assert op.image == "docker://me/img:7"
    assert "secrets" not in op.template_fields


def test_bad_resources_fail_when_the_dag_is_parsed():
    import offload

    with pytest.raises(offload.ConfigError, match="negative"):
        OffloadOperator(task_id="t", command=["true"], gpus=-1)


def test_a_connection_becomes_a_site_profile_with_private_key_files(tmp_path):
    from airflow.sdk import Connection

    conn = Connection(conn_id="hpc", conn_type="offload", host="login.example.org", port=2222, login="jdoe",
                      extra=json.dumps({"private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END "
                                        "OPENSSH PRIVATE KEY-----", "host_key": "ssh-ed25519 AAAAC3Nz",
                                        "partition": "gpu", "gpus_per_node": 4}))  # fmt: skip
    config = site_config("hpc", conn)
    assert (config.host, config.port, config.user, config.partition, config.gpus_per_node) == (
        "login.example.org", 2222, "jdoe", "gpu", 4)  # fmt: skip
    key = Path(config.identity_files[0])
    assert oct(key.stat().st_mode & 0o777) == "0o600" and oct(key.parent.stat().st_mode & 0o777) == "0o700"
    assert Path(config.known_hosts).read_text() == "[login.example.org]:2222 ssh-ed25519 AAAAC3Nz\n"
    bad = Connection(conn_id="bad", conn_type="offload", host="h", extra=json.dumps({"partiton": "gpu"}))
    with pytest.raises(Exception, match="did you mean 'partition'"):
        site_config("bad", bad)
    os.environ.pop("OFFLOAD_SITE", None)
