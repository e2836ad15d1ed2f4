import textwrap

import pytest

from offload import ConfigError, load_profiles


def write(tmp_path, text):
    path = tmp_path / "sites.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_local_site_exists_without_any_file(tmp_path, monkeypatch):
    monkeypatch.delenv("OFFLOAD_SITE", raising=False)
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "nothing-here.toml"))
    with pytest.raises(ConfigError, match="no such file"):
        load_profiles()
    monkeypatch.delenv("OFFLOAD_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    profiles = load_profiles()
    assert profiles.get(None).name == "local"
    assert profiles.get(None).scheduler == "local"


def test_typo_names_file_site_key_and_suggests(tmp_path):
    path = write(
        tmp_path,
        """
        [sites.hpc]
        host = "login.example.org"
        partiton = "gpu"
        """,
    )
    with pytest.raises(ConfigError) as err:
        load_profiles(path).get("hpc")
    message = str(err.value)
    assert str(path) in message and "[sites.hpc]" in message and "'partiton'" in message
    assert "did you mean 'partition'" in message


def test_malformed_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[sites.hpc\nhost = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_profiles(path)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("port = 'twenty-two'", "whole number"),
        ("gpus_per_node = -1", "cannot be negative"),
        ("gpu_request = '--gpu'", "one of"),
        ("walltime = '1h'", "walltime"),
        ("setup = [1, 2]", "list of strings"),
        ("poll_interval = 0", "positive"),
        ("env = {'A=1;touch /tmp/x;B' = '1'}", "not an environment variable name"),
        ("env = {OFFLOAD_JOB_DIR = '/x'}", "offload's own"),
        ("runtime = 'apptainr'", "did you mean 'apptainer'"),
        ("scheduler = 'pbs'", "Known: gridengine, local, slurm"),
        ("shebang = 'bash'", "starting with '#!'"),
    ],
)
def test_values_are_type_checked(tmp_path, line, match):
    path = write(tmp_path, f"[sites.hpc]\nhost = 'h'\n{line}\n")
    with pytest.raises(ConfigError, match=match):
        load_profiles(path).get("hpc")


def test_unknown_site_suggests_the_nearest(tmp_path):
    path = write(tmp_path, "[sites.leonardo]\nhost = 'h'\n")
    with pytest.raises(ConfigError, match="did you mean 'leonardo'"):
        load_profiles(path).get("leonado")


def test_site_needs_a_host(tmp_path):
    path = write(tmp_path, "[sites.hpc]\nscheduler = 'slurm'\n")
    with pytest.raises(ConfigError, match="no 'host'"):
        load_profiles(path).get("hpc")


def test_a_mistake_in_one_site_leaves_the_others_working(tmp_path, monkeypatch):
    path = write(tmp_path, "[sites.broken]\nhost = 'h'\npartiton = 'x'\n[sites.good]\nhost = 'g'\n")
    profiles = load_profiles(path)
    assert profiles.get("good").host == "g" and profiles.get("local").name == "local"
    with pytest.raises(ConfigError, match="partiton"):
        profiles.get("broken")
    monkeypatch.setenv("OFFLOAD__GOOD__PARTITON", "gpu")
    with pytest.raises(ConfigError, match="environment variable OFFLOAD__GOOD__PARTITON") as err:
        load_profiles(path).get("good")
    assert str(path) not in str(err.value)  # the mistake is in the environment, not the file


def test_default_site_and_environment_overrides(tmp_path, monkeypatch):
    path = write(
        tmp_path,
        """
        default_site = "hpc"
        [sites.hpc]
        host = "h"
        partition = "cpu"
        setup = "module load apptainer"
        """,
    )
    monkeypatch.delenv("OFFLOAD_SITE", raising=False)
    monkeypatch.setenv("OFFLOAD__HPC__PARTITION", "debug")
    monkeypatch.setenv("OFFLOAD__HPC__GPUS_PER_NODE", "8")
    site = load_profiles(path).get(None)
    assert site.name == "hpc"
    assert site.partition == "debug" and site.gpus_per_node == 8
    assert site.setup == ("module load apptainer",)
    monkeypatch.setenv("OFFLOAD_SITE", "local")
    assert load_profiles(path).get(None).name == "local"


def test_default_site_must_exist(tmp_path):
    path = write(tmp_path, "default_site = 'nope'\n")
    with pytest.raises(ConfigError, match="names no site"):
        load_profiles(path)


def test_a_schedulers_own_keys_are_its_plugins_to_check(tmp_path):
    """gpu_request is SLURM's: its choices come from the SLURM plugin, and a Grid Engine site does not have it."""
    path = write(
        tmp_path,
        """
        [sites.s]
        host = "a"
        gpu_request = "--gpus-per-nod"
        [sites.g]
        host = "b"
        scheduler = "gridengine"
        gpu_request = "--gres"
        [sites.ok]
        host = "c"
        gpu_request = "--gres"
        """,
    )
    profiles = load_profiles(path)
    with pytest.raises(ConfigError, match="of scheduler 'slurm' must be one of.*did you mean '--gpus-per-node'"):
        profiles.get("s")
    with pytest.raises(ConfigError, match="unknown key 'gpu_request'.*gpu_resource"):
        profiles.get("g")
    assert profiles.get("ok").scheduler_keys == {"gpu_request": "--gres"}
