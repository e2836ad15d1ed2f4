"""The SLURM scheduler's rendering and parsing, with the transport stubbed at its seam (the real thing runs in
tests/integration)."""

import pytest

from offload import ConfigError, JobSpec, JobState, Resources
from offload.config import SiteConfig
from offload.jobs import JobRef
from offload.schedulers.slurm import SlurmScheduler
from offload.transports.base import CommandResult

SITE = SiteConfig(
    name="hpc", host="h", partition="cpu", gpu_partition="gpu", gpus_per_node=4, account="proj", walltime="01:00:00"
)


def directives(spec, site=SITE, array=None):
    return [d.removeprefix("#SBATCH ") for d in SlurmScheduler(site).directives(spec, "/w/jobs/j1", array)]


def test_gpu_job_goes_to_the_gpu_partition_with_site_defaults():
    d = directives(JobSpec(["x"], name="train", resources=Resources(gpus=2, cpus=8, memory="16G")))
    assert d == [
        "--job-name=train", "--output=/w/jobs/j1/output", "--chdir=/w/jobs/j1", "--nodes=1",
        "--cpus-per-task=8", "--mem=16384M", "--partition=gpu", "--gpus=2", "--time=01:00:00", "--account=proj",
    ]  # fmt: skip


def test_cpu_job_uses_the_default_partition_and_own_walltime():
    d = directives(JobSpec(["x"], resources=Resources(walltime="2-00:00:00", qos="long", extra=["--exclusive"])))
    assert "--partition=cpu" in d and "--time=2-00:00:00" in d and "--qos=long" in d and d[-1] == "--exclusive"


def test_gres_syntax_and_array_outputs():
    site = SITE.with_overrides(gpu_request="--gres")
    d = directives(JobSpec(["x"], resources=Resources(gpus=4)), site, array=10)
    assert "--gres=gpu:4" in d and "--array=0-9" in d and "--output=/w/jobs/j1/output.%a" in d


def test_more_gpus_than_a_node_has_says_how_many_nodes():
    with pytest.raises(ConfigError, match="nodes=2"):
        directives(JobSpec(["x"], resources=Resources(gpus=8)))


def test_values_that_would_break_a_directive_are_refused():
    with pytest.raises(ConfigError, match="partition"):
        directives(JobSpec(["x"], resources=Resources(partition="gpu --uid=0")))


def test_job_ids_from_parsable_output():
    s = SlurmScheduler(SITE)
    assert s.job_ids("1234\n", None) == ["1234"]
    assert s.job_ids("1234;cluster\n", None) == ["1234"]
    assert s.job_ids("55\n", 3) == ["55_0", "55_1", "55_2"]
    with pytest.raises(ValueError, match="instead of a job id"):
        s.job_ids("sbatch: error: x\n", None)


class Replies:
    """A transport stub: answers each command by its first word, and records the calls."""

    def __init__(self, **outputs):
        self.outputs = outputs
        self.calls = []

    async def run(self, argv, *, input=None, check=True, timeout=None):
        self.calls.append(list(argv))
        rc, out, err = self.outputs[argv[0]]
        return CommandResult(tuple(argv), rc, out, err)


async def test_one_squeue_call_maps_states_reasons_and_exact_exit_codes():
    squeue = "\n".join(
        [
            "7_0|FAILED|NonZeroExitCode|768|node1|",
            "7_1|COMPLETED|None|0|node1|",
            "8|PENDING|Priority|0||",
            "9|CANCELLED|None|15|node1|",
            "10|TIMEOUT|TimeLimit|0|node1|",
            "11|OUT_OF_MEMORY|OutOfMemory|0:125|node1|",
        ]
    )
    t = Replies(squeue=(0, squeue, ""))
    refs = [JobRef(i, "/d") for i in ("7_0", "7_1", "8", "9", "10", "11")]
    st = await SlurmScheduler(SITE).poll(t, refs)
    assert len(t.calls) == 1 and "--jobs=7_0,7_1,8,9,10,11" in t.calls[0]
    assert (st["7_0"].state, st["7_0"].exit_code) == (JobState.FAILED, 3)
    assert (st["7_1"].state, st["7_1"].exit_code) == (JobState.COMPLETED, 0)
    assert (st["8"].state, st["8"].reason, st["8"].exit_code) == (JobState.PENDING, "Priority", None)
    assert (st["9"].state, st["9"].signal) == (JobState.CANCELLED, 15)
    assert st["10"].state is JobState.TIMEOUT
    assert st["11"].state is JobState.FAILED and st["11"].reason == "OutOfMemory"


async def test_jobs_gone_from_the_queue_are_read_from_sacct_then_exit_code_files():
    t = Replies(
        squeue=(1, "", "slurm_load_jobs error: Invalid job id specified"),
        sacct=(0, "5|COMPLETED|0:0\n6|CANCELLED by 1000|0:15\n", ""),
        sh=(0, "/d/exitcode|2\n", ""),
    )
    st = await SlurmScheduler(SITE).poll(t, [JobRef("5", "/d"), JobRef("6", "/d"), JobRef("4", "/d")])
    assert st["5"].state is JobState.COMPLETED
    assert st["6"].state is JobState.CANCELLED
    assert (st["4"].state, st["4"].exit_code) == (JobState.FAILED, 2)


async def test_without_accounting_sacct_is_asked_once():
    t = Replies(squeue=(0, "", ""), sacct=(1, "", "accounting storage is disabled"), sh=(0, "/d/exitcode|0\n", ""))
    scheduler = SlurmScheduler(SITE)
    for _ in range(3):
        st = await scheduler.poll(t, [JobRef("5", "/d")])
        assert st["5"].state is JobState.COMPLETED
    assert [c[0] for c in t.calls].count("sacct") == 1
