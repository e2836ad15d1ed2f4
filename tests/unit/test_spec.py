import pytest

from offload import ConfigError, JobSpec, Mount, Resources
from offload.spec import format_walltime, parse_memory, parse_walltime


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800),
        ("30:15", 1815),
        ("02:00:00", 7200),
        ("1-00", 86400),
        ("1-02:03", 93780),
        ("2-01:00:05", 176405),
        (90, 90),
    ],
)
def test_walltime_forms_slurm_accepts(text, seconds):
    assert parse_walltime(text) == seconds


@pytest.mark.parametrize("bad", ["", "1h", "01:60:00", "-5", "0", "0:00:00", "a-01:00:00", True, 0, -3])
def test_bad_walltime_is_refused_with_an_example(bad):
    with pytest.raises(ConfigError, match="walltime"):
        parse_walltime(bad)


def test_walltime_round_trips_through_format():
    for seconds in (59, 3600, 86399, 86400, 200000):
        assert parse_walltime(format_walltime(seconds)) == seconds


@pytest.mark.parametrize(("text", "mb"), [("4G", 4096), ("500M", 500), ("1.5GB", 1536), ("2GiB", 2048), (64, 64)])
def test_memory_sizes(text, mb):
    assert parse_memory(text) == mb


@pytest.mark.parametrize("bad", ["lots", "-1G", "0", "4X"])
def test_bad_memory_is_refused(bad):
    with pytest.raises(ConfigError, match="memory"):
        parse_memory(bad)


def test_negative_gpus_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="cannot be negative.*use 0"):
        Resources(gpus=-1)


def test_command_must_be_an_argv_list():
    with pytest.raises(ConfigError, match="argv list"):
        JobSpec("python3 train.py")
    with pytest.raises(ConfigError, match="non-empty"):
        JobSpec([])


def test_env_names_are_checked_and_secrets_do_not_show_in_repr():
    with pytest.raises(ConfigError, match="not a valid environment variable name"):
        JobSpec(["true"], env={"BAD-NAME": "x"})
    spec = JobSpec(["true"], secrets={"TOKEN": "hunter2"})
    assert "hunter2" not in repr(spec)


def test_env_and_secrets_cannot_share_a_name():
    with pytest.raises(ConfigError, match="both as env and as secrets"):
        JobSpec(["true"], env={"A": "1"}, secrets={"A": "2"})


def test_equal_specs_hash_equal_so_they_can_form_an_array():
    a = JobSpec(["python3", "x.py"], env={"A": "1"}, resources=Resources(gpus=1))
    b = JobSpec(("python3", "x.py"), env={"A": "1"}, resources=Resources(gpus=1))
    assert a == b and hash(a) == hash(b)
    assert a != JobSpec(["python3", "y.py"], env={"A": "1"}, resources=Resources(gpus=1))


def test_spec_env_is_read_only():
    spec = JobSpec(["true"], env={"A": "1"})
    with pytest.raises(TypeError):
        spec.env["B"] = "2"


def test_mount_parsing():
    assert Mount.parse("/data") == Mount("/data")
    assert Mount.parse("/data:/in:ro") == Mount("/data", "/in", True)
    with pytest.raises(ConfigError, match="absolute path"):
        Mount.parse("data:/in")
    with pytest.raises(ConfigError, match="SRC"):
        Mount.parse("/a:/b:c:d")


def test_job_name_is_checked():
    with pytest.raises(ConfigError, match="job name"):
        JobSpec(["true"], name="has space")
