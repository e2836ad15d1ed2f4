"""The provider's metadata, serialisation and templating, in a real Airflow 3.3 (no site needed)."""

import contextlib
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


def test_a_trigger_claiming_a_race_round_trips_with_its_attempts_and_nothing_else():
    placement = json.dumps(
        {
            "id": "p1",
            "name": "t-1",
            "state": "placing",
            "claiming": None,
            "width": 2,
            "wait": 600,
            "attempts": [{"site": "a", "jobdir": "/w/jobs/t-1-p1-a", "job_id": "7"}],
        }
    )
    trigger = OffloadJobTrigger(placement=placement, masks=["s3cr3t"])
    path, kwargs = trigger.serialize()
    module, _, name = path.rpartition(".")
    again = getattr(__import__(module, fromlist=[name]), name)(**json.loads(json.dumps(kwargs)))
    assert again.serialize() == (path, kwargs) and again.placement == placement
    with pytest.raises(ValueError, match="watches a job"):
        OffloadJobTrigger()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"policy": "fastest"}, "use one of 'first-fit', 'race'"),
    ({"policy": "failover", "site": "a,b"}, "a trigger must not do: race over those sites"),
    ({"policy": "race"}, "several site profiles"),
    ({"policy": "race", "site": "a,b", "offload_conn_id": "hpc"}, "a connection is one site"),
    ({"policy": "race", "site": "a,b", "width": 0}, "at least 1"),
])  # fmt: skip
def test_a_bad_placement_fails_when_the_dag_is_parsed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OffloadOperator(task_id="t", command=["true"], **kwargs)


def test_templated_fields_render():
    op = OffloadOperator(task_id="t", command=["echo", "{{ ds }}", "{{ params.n }}"], env={"DAY": "{{ ds }}"},
                         image="docker://me/img:{{ params.n }}", gpus="{{ params.n // 3 }}",
                         walltime="{{ params.time }}", secrets={"KEY": "{{ params.key }}"})  # fmt: skip
    context = {"ds": "2026-01-01", "params": {"n": 7, "time": "00:30:00", "key": "k3y"}}
    op.render_template_fields(context)
    assert op.command == ["echo", "2026-01-01", "7"]
    assert op.env == {"DAY": "2026-01-01"}
    assert op.image == "docker://me/img:7"
    resources = op.job_resources()
    assert (resources.gpus, resources.walltime) == (2, "00:30:00")
    assert op.secrets == {"KEY": "k3y"}  # rendered, and hidden in Airflow's rendered view (a "secret" field)
    with pytest.raises(Exception, match="not a whole number"):
        OffloadOperator(task_id="u", command=["true"], gpus="{{ x }}").job_resources()


def test_bad_resources_fail_when_the_dag_is_parsed():
    import offload

    with pytest.raises(offload.ConfigError, match="negative"):
        OffloadOperator(task_id="t", command=["true"], gpus=-1)


KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----"


def test_a_connection_becomes_a_site_profile_with_its_keys_in_memory(tmp_path):
    from airflow.sdk import Connection

    conn = Connection(conn_id="hpc", conn_type="offload", host="login.example.org", port=2222, login="jdoe",
                      extra=json.dumps({"private_key": KEY, "host_key": "ssh-ed25519 AAAAC3Nz", "partition": "gpu",
                                        "gpus_per_node": 4}))  # fmt: skip
    config = site_config("hpc", conn)
    assert (config.host, config.port, config.user, config.partition, config.gpus_per_node) == (
        "login.example.org", 2222, "jdoe", "gpu", 4)  # fmt: skip
    assert config.private_key.startswith("-----BEGIN") and config.identity_files == ()
    assert config.host_keys == "[login.example.org]:2222 ssh-ed25519 AAAAC3Nz\n"
    assert config.known_hosts is None  # nothing on disk
    assert KEY not in repr(config)
    bad = Connection(conn_id="bad", conn_type="offload", host="h", extra=json.dumps({"partiton": "gpu"}))
    with pytest.raises(Exception, match="did you mean 'partition'"):
        site_config("bad", bad)
    os.environ.pop("OFFLOAD_SITE", None)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"host_key": "x\nHost *\n ProxyCommand touch /tmp/pwned"}, "must be one line"),
        ({"host_key": "ssh-ed25519 AAAA C3"}, "must be one line"),
        ({"ssh_config": "/tmp/evil_config"}, "ProxyCommand"),
        ({"known_hosts": "/tmp/kh"}, "host_key"),
        ({"identity_files": ["/tmp/k"]}, "private_key"),
        ({"transport": "local"}, "over SSH"),
    ],
)  # fmt: skip
def test_a_connection_cannot_run_code_on_the_worker(extra, message):
    from airflow.sdk import Connection

    conn = Connection(conn_id="evil", conn_type="offload", host="h", extra=json.dumps(extra))
    with pytest.raises(Exception, match=message):
        site_config("evil", conn)
    assert not Path("/tmp/pwned").exists()


def test_airflows_ssh_connection_type_works_with_a_profile(tmp_path, monkeypatch):
    from airflow.sdk import Connection

    (tmp_path / "sites.toml").write_text("[sites.hpc]\nhost = 'other'\nscheduler = 'slurm'\npartition = 'cpu'\n")
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    conn = Connection(conn_id="ssh_hpc", conn_type="ssh", host="login.example.org", login="jdoe",
                      extra=json.dumps({"private_key": KEY, "host_key": "ssh-ed25519 AAAAC3Nz", "timeout": 10,
                                        "no_host_key_check": False}))  # fmt: skip
    config = site_config("ssh_hpc", conn, site="hpc")
    assert (config.name, config.host, config.user, config.partition) == ("hpc", "login.example.org", "jdoe", "cpu")
    assert config.host_keys == "login.example.org ssh-ed25519 AAAAC3Nz\n"


class _Evil:
    """What a hostile host would leave as output.pkl: unpickling it runs code on the worker."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_task_offload_result_is_unpickled_only_when_signed_with_the_tasks_key(tmp_path):
    """@task.offload's runner signs its result with the key it got as a secret; anything else is refused before
    pickle sees it (the connection's host could be anyone's)."""
    import pickle
    import secrets
    import subprocess
    import sys
    from types import SimpleNamespace

    import cloudpickle

    from airflow_offload.decorators.offload import RESULT_KEY, RUNNER, verified
    from airflow_offload.version_compat import AirflowException

    key = secrets.token_hex(32)
    (tmp_path / "input.pkl").write_bytes(cloudpickle.dumps((lambda x: {"twice": 2 * x}, [21], {})))
    env = {"OFFLOAD_JOB_DIR": str(tmp_path), RESULT_KEY: key}
    subprocess.run([sys.executable, "-c", RUNNER], env=env, check=True, timeout=60)
    signed = (tmp_path / "output.pkl").read_bytes()
    job = SimpleNamespace(id="7", ref=SimpleNamespace(jobdir=str(tmp_path)))
    assert pickle.loads(verified(signed, key, job)) == {"twice": 42}

    marker = tmp_path / "ran-code-on-the-worker"
    hostile = pickle.dumps(_Evil(str(marker)))
    for forged in (hostile, b"\0" * 32 + hostile, signed[:32] + hostile):
        with pytest.raises(AirflowException, match="not signed with this task's key"):
            pickle.loads(verified(forged, key, job))
    with pytest.raises(AirflowException, match="not signed"):
        verified(signed, secrets.token_hex(32), job)  # another try's key
    with pytest.raises(AirflowException, match="not signed"):
        verified(signed, None, job)
    assert not marker.exists()


def test_the_trigger_hands_the_result_key_back_to_the_resuming_worker():
    trigger = OffloadJobTrigger(job_id="5", jobdir="/j", result_key="ab" * 32)
    _, kwargs = trigger.serialize()
    assert kwargs["result_key"] == "ab" * 32


async def test_a_job_ending_right_after_the_deferral_resumes_the_task_only_once_the_worker_exit_is_seen(
    monkeypatch, capsys
):
    """Airflow 3.3 fails a task whose deferring worker's exit reaches the scheduler after the trigger queued it
    again (apache/airflow#67287, reproduced on the test site with a 3 s job): the event waits out the settle
    counted from the deferral. A trigger run long after it (a triggerer restart) does not wait, nor one run in the
    process that deferred (``dag.test()``: no executor)."""
    import time

    import offload
    from airflow_offload.triggers import offload as triggers

    monkeypatch.setattr(triggers, "RESUME_SETTLE", 2.0)
    job = offload.load_site("local").submit(offload.JobSpec(["true"], name="settle"))
    job.wait(timeout=60)
    cases = [
        ({"deferred_at": time.time(), "deferred_by": "worker-host:4242"}, True),
        ({"deferred_at": time.time() - 3600, "deferred_by": "worker-host:4242"}, False),
        (triggers.deferral(), False),
    ]
    for deferred, waits in cases:
        trigger = OffloadJobTrigger(job_id=job.id, jobdir=job.ref.jobdir, site="local", **deferred)
        events = [event async for event in trigger.run()]
        said = capsys.readouterr()
        assert [e.payload["state"] for e in events] == ["COMPLETED"]
        assert ("resuming the task in" in said.out + said.err) is waits, (deferred, said)
        if waits:  # a lower bound only: a sleep is never shorter
            assert time.time() >= deferred["deferred_at"] + 2.0


def test_deferrable_defaults_to_airflows_operators_default_deferrable():
    """Like Airflow's own providers: ``[operators] default_deferrable`` decides when the DAG does not, and the
    default is read when the provider is imported (a fresh process per setting)."""
    import subprocess
    import sys

    code = ("from airflow_offload import OffloadOperator\n"
            "print(OffloadOperator(task_id='t', command=['true']).deferrable,"
            " OffloadOperator(task_id='u', command=['true'], deferrable=False).deferrable)")  # fmt: skip
    for value, expected in (("True", "True False"), ("False", "False False")):
        env = {**os.environ, "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": value}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().splitlines()[-1] == expected


def test_the_connection_forms_test_button_answers_with_offloads_message(monkeypatch):
    """Mirrors Airflow's ``POST /connections/test`` (api_fastapi ... routes/public/connections.py): the form's
    fields become a transient ``AIRFLOW_CONN_<ID>`` and ``Connection.test_connection()`` asks the hook. A site
    that does not answer is a (False, offload's message), never a traceback; nothing listens on port 1."""
    import asyncssh
    from airflow.models.connection import Connection

    from airflow_offload import OffloadHook

    key = asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode()
    conn = Connection(conn_id="transient1", conn_type="offload", host="127.0.0.1", port=1, login="jdoe",
                      extra=json.dumps({"private_key": key, "host_key": "ssh-ed25519 AAAAC3Nz"}))  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_TRANSIENT1", conn.get_uri())
    status, message = conn.test_connection()
    assert status is False
    assert "127.0.0.1" in message and "test_connection" not in message, message
    status, message = OffloadHook(offload_conn_id="no_such_connection").test_connection()
    assert status is False and "no_such_connection" in message


def test_the_hooks_test_connection_runs_offloads_doctor_on_the_site(tmp_path, monkeypatch):
    from airflow_offload import OffloadHook

    (tmp_path / "sites.toml").write_text(f"[sites.here]\ntransport = 'local'\nscheduler = 'local'\nruntime = 'none'\n"
                                         f"workdir = '{tmp_path / 'work'}'\n")  # fmt: skip
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    status, message = OffloadHook(site="here").test_connection()
    assert status is True, message
    assert "here" in message
    (tmp_path / "a-file").write_text("")  # a workdir under a file: mkdir fails, even as root
    (tmp_path / "sites.toml").write_text(f"[sites.here]\ntransport = 'local'\nscheduler = 'local'\nruntime = 'none'\n"
                                         f"workdir = '{tmp_path / 'a-file' / 'work'}'\n")  # fmt: skip
    status, message = OffloadHook(site="here").test_connection()
    assert status is False and "workdir" in message, message


class _FakeTI:
    dag_id, task_id, run_id, map_index = "d", "t", "manual__1", -1

    def __init__(self) -> None:
        self.pushed: dict[str, object] = {}

    def xcom_push(self, key: str, value: object) -> None:
        self.pushed[key] = value


class _FakeJob:
    """What the operator uses of an offload Job: a status, output, a cancel; no site behind it."""

    def __init__(self, site: "_FakeSite", job_id: str, state, exit_code: int | None = 0, jobdir: str = "") -> None:
        from types import SimpleNamespace

        self.site, self.id, self._state, self._exit_code = site, job_id, state, exit_code
        self.ref = SimpleNamespace(jobdir=jobdir or f"/home/u/offload/jobs/t-{job_id}", index=None)

    def status(self, refresh: bool = True):
        import offload

        return offload.JobStatus(self._state, exit_code=self._exit_code)

    def wait(self, timeout=None):
        return self.status()

    def logs(self, follow: bool = False, interval=None):
        yield "the last line"

    def tail(self, lines: int = 20) -> str:
        return "the tail"

    def cancel(self) -> None:
        import offload

        self._state = offload.JobState.CANCELLED
        self.site.cancelled.append(self.id)


class _FakeSite:
    """A site whose earlier try's jobs, submissions and remote commands are recorded, not run."""

    name = "fake"

    def __init__(self, earlier=(), ends=None, exit_code: int = 0, jobdir: str = "") -> None:
        import offload

        self.earlier = [_FakeJob(self, job_id, state) for job_id, state in earlier]
        self.ends, self.exit_code, self.jobdir = ends or offload.JobState.COMPLETED, exit_code, jobdir
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self.ran: list[list[str]] = []

    def validate(self, spec) -> None:
        pass

    def find(self, name: str):
        return list(self.earlier)

    def submit(self, spec):
        self.submitted.append(spec.name)
        return _FakeJob(self, "new", self.ends, self.exit_code, self.jobdir)

    def workdir(self) -> str:
        return "/home/u/offload"

    def transport_run(self, argv) -> str:
        self.ran.append(list(argv))
        return ""


def _run(monkeypatch, site: _FakeSite, **kwargs):
    """Execute an OffloadOperator (sync) against ``site``; return (return value or exception, pushed XComs)."""
    from airflow_offload.hooks.offload import OffloadHook

    monkeypatch.setattr(OffloadHook, "get_site", lambda self, spec=None: site)
    monkeypatch.setattr(OffloadHook, "get_sites", lambda self: [site])
    ti = _FakeTI()
    op = OffloadOperator(task_id="t", command=["true"], deferrable=False, **kwargs)
    try:
        outcome = op.execute({"ti": ti})
    except Exception as exc:
        outcome = exc
    return outcome, ti.pushed


def test_xcoms_are_pushed_only_with_do_xcom_push(monkeypatch):
    outcome, pushed = _run(monkeypatch, _FakeSite())
    assert outcome == "the last line"
    assert pushed == {"job_id": "new", "state": "COMPLETED", "exit_code": 0}
    outcome, pushed = _run(monkeypatch, _FakeSite(), do_xcom_push=False)
    assert outcome is None and pushed == {}


def test_reattach_on_restart_can_be_turned_off(monkeypatch):
    import offload

    site = _FakeSite(earlier=[("old", offload.JobState.RUNNING)])
    _, pushed = _run(monkeypatch, site)
    assert pushed["job_id"] == "old" and site.submitted == [] and site.cancelled == []  # reattached (default)
    site = _FakeSite(earlier=[("old", offload.JobState.RUNNING)])
    _, pushed = _run(monkeypatch, site, reattach_on_restart=False)
    assert pushed["job_id"] == "new" and len(site.submitted) == 1
    assert site.cancelled == ["old"]  # the earlier try's job does not run beside the new one


@pytest.mark.parametrize(
    ("cleanup", "ends", "removed"),
    [
        ("never", "COMPLETED", False),
        ("on_success", "COMPLETED", True),
        ("on_success", "FAILED", False),
        ("always", "FAILED", True),
    ],
)  # fmt: skip
def test_job_directories_are_cleaned_as_asked(monkeypatch, cleanup, ends, removed):
    import offload

    site = _FakeSite(ends=offload.JobState(ends), exit_code=0 if ends == "COMPLETED" else 3)
    outcome, _ = _run(monkeypatch, site, cleanup=cleanup)
    assert (outcome == "the last line") == (ends == "COMPLETED")
    assert site.ran == ([["rm", "-rf", "--", "/home/u/offload/jobs/t-new"]] if removed else [])


def test_cleanup_removes_only_a_job_directory_and_its_value_is_checked_when_the_dag_is_parsed(monkeypatch):
    for jobdir in ("/home/u/offload", "/home/u/offload/jobs", "/home/u/offload/images/x", "/home/u/other/jobs/x",
                   "/home/u/offload/jobs/.."):  # fmt: skip
        site = _FakeSite(jobdir=jobdir)
        outcome, _ = _run(monkeypatch, site, cleanup="always")
        assert outcome == "the last line" and site.ran == [], jobdir
    with pytest.raises(ValueError, match="never"):
        OffloadOperator(task_id="t", command=["true"], cleanup="sometimes")


def test_a_failed_deferral_cancels_the_job_without_airflows_private_names(monkeypatch):
    """The failure is built as Airflow's scheduler and triggerer build it (``airflow.models.trigger``: the
    ``__fail__`` next method with a ``TriggerFailureReason``); the provider learns of it from the public
    exceptions ``BaseOperator.resume_execution`` raises, not from ``TRIGGER_FAIL_REPR`` (``:meta private:``)."""
    from airflow.models.trigger import TRIGGER_FAIL_REPR, TriggerFailureReason
    from airflow.sdk.exceptions import TaskDeferralError, TaskDeferralTimeout

    import airflow_offload
    import offload
    from airflow_offload.hooks.offload import OffloadHook

    for reason, raised in ((TriggerFailureReason.TRIGGER_TIMEOUT, TaskDeferralTimeout),
                           (TriggerFailureReason.TRIGGER_FAILURE, TaskDeferralError)):  # fmt: skip
        site = _FakeSite(earlier=[("live", offload.JobState.RUNNING)])
        monkeypatch.setattr(OffloadHook, "get_site", lambda self, spec=None, site=site: site)
        monkeypatch.setattr(OffloadHook, "get_sites", lambda self, site=site: [site])
        op = OffloadOperator(task_id="t", command=["true"])
        with pytest.raises(raised):
            op.resume_execution(TRIGGER_FAIL_REPR, {"error": reason}, {"ti": _FakeTI()})
        assert site.cancelled == ["live"]
    private = ("TRIGGER_FAIL_REPR", "TriggerFailureReason", "airflow.sdk.bases.operator", "__fail__")
    for path in Path(airflow_offload.__file__).parent.rglob("*.py"):
        assert not any(name in path.read_text() for name in private), path


def test_the_provider_declares_a_minimum_airflow_without_a_cap_and_all_does_not_install_airflow():
    """``pip install -e '.[all]'`` (the README's first command) must not bring all of Airflow and its pins into
    a user's environment; ``[airflow]`` does, from the version the provider checks for, with no upper cap."""
    import configparser
    import tomllib

    from packaging.requirements import Requirement

    from airflow_offload.version_compat import MIN_AIRFLOW_VERSION

    repo = Path(__file__).parents[2]
    extras = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    airflow = [Requirement(r) for r in extras["airflow"] if Requirement(r).name == "apache-airflow"]
    assert [str(r.specifier) for r in airflow] == [f">={MIN_AIRFLOW_VERSION}"]
    assert not any("airflow" in Requirement(r).extras or "airflow" in Requirement(r).name for r in extras["all"])
    tox = configparser.ConfigParser()
    tox.read(repo / "tox.ini")
    assert "airflow" in tox["testenv:airflow"]["extras"].split()  # the provider's tests still get Airflow


def test_with_several_sites_a_retry_reattaches_to_the_earlier_tries_job_on_whichever_site_it_went(monkeypatch):
    """``site="a,b"``: the new try would go to the first site (where it starts first now), but the earlier try's
    job still runs on the second: that one is taken over, nothing is submitted."""
    import offload
    from airflow_offload.hooks.offload import OffloadHook

    chosen, other = _FakeSite(), _FakeSite(earlier=[("old", offload.JobState.RUNNING)])
    other.name = "other"
    monkeypatch.setattr(OffloadHook, "get_site", lambda self, spec=None: chosen)
    monkeypatch.setattr(OffloadHook, "get_sites", lambda self: [chosen, other])
    ti = _FakeTI()
    with contextlib.suppress(Exception):  # the fake job never ends: what matters is which job the task took
        OffloadOperator(task_id="t", command=["true"], deferrable=False, site="a,b").execute({"ti": ti})
    assert ti.pushed["job_id"] == "old" and chosen.submitted == [] and other.submitted == []


def test_a_hook_naming_several_profiles_chooses_with_the_spec_and_lists_them_all(tmp_path, monkeypatch):
    """Real local sites in a profile file with a group: the ranking is offload's own (both could start it now:
    the group's order)."""
    import offload
    from airflow_offload.hooks.offload import OffloadHook

    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    (tmp_path / "sites.toml").write_text("".join(
        f'[sites.{name}]\ntransport = "local"\nscheduler = "local"\nruntime = "none"\nworkdir = "{tmp_path / name}"\n'
        for name in ("east", "west")) + '[groups]\npair = ["west", "east"]\n')  # fmt: skip
    hook = OffloadHook(site="@pair")
    assert [site.name for site in hook.get_sites()] == ["west", "east"]
    assert hook.get_site(offload.JobSpec(["true"])).name == "west"
    assert hook.get_site().name == "west"  # without a spec: the first (what the TaskFlow decorator asks)
    assert [site.name for site in OffloadHook(site="east").get_sites()] == ["east"]


def test_a_race_in_a_worker_runs_once_and_a_retry_finishes_the_race_its_failed_try_left(tmp_path, monkeypatch):
    """Two real local sites: ``policy="race"`` without deferral claims in the worker, and the task's result is the
    run's. Then a try that died after submitting its attempts (both waiting at their gate, unclaimed): the retry
    finds them by the task's job name on each site and finishes that race, submitting nothing new."""
    import offload

    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    monkeypatch.setenv("OFFLOAD_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "sites.toml").write_text("".join(
        f'[sites.{name}]\ntransport = "local"\nscheduler = "local"\nruntime = "none"\nworkdir = "{tmp_path / name}"\n'
        "poll_interval = 0.5\n" for name in ("east", "west")) + '[groups]\npair = ["east", "west"]\n')  # fmt: skip
    command = ["sh", "-c", f"echo run >> {tmp_path}/runs; echo ran on $OFFLOAD_JOB_DIR"]
    op = OffloadOperator(task_id="t", command=command, deferrable=False, site="@pair", policy="race")
    ti = _FakeTI()
    assert op.execute({"ti": ti}).startswith(f"ran on {tmp_path}")
    assert (tmp_path / "runs").read_text() == "run\n"

    ti = _FakeTI()
    op = OffloadOperator(task_id="u", command=command, deferrable=False, site="@pair", policy="race")
    spec = op.build_spec({"ti": ti})
    left = offload.load_sites("@pair").start(spec, policy="race", patience=None)  # ... and the worker dies
    value = op.execute({"ti": ti})
    assert (tmp_path / "runs").read_text() == "run\nrun\n"
    assert ti.pushed["job_id"] in {a.job_id for a in left.record.attempts}, (ti.pushed, left.record.attempts)
    assert value.startswith(f"ran on {tmp_path}")
