"""The SLURM scheduler's rendering and parsing, with the transport stubbed at its seam (the real thing runs in
tests/integration)."""

import pytest

from offload import ConfigError, EndCause, JobSpec, JobState, Resources
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
    site = SITE.with_overrides(scheduler_keys={"gpu_request": "--gres"})
    d = directives(JobSpec(["x"], resources=Resources(gpus=4)), site, array=10)
    assert "--gres=gpu:4" in d and "--array=0-9" in d and "--output=/w/jobs/j1/output.%a" in d


def test_more_gpus_than_a_node_has_says_how_many_nodes():
    with pytest.raises(ConfigError, match="--nodes 2 --gpus-per-node 4"):
        directives(JobSpec(["x"], resources=Resources(gpus=8)))


@pytest.mark.parametrize(
    ("syntax", "resources", "expected"),
    [
        ("--gpus", Resources(gpus=5, nodes=2), "--gpus=5"),  # SLURM spreads them: exactly what was meant
        ("--gres", Resources(gpus=4, nodes=2), "--gres=gpu:2"),
        ("--gres", Resources(gpus_per_node=3, nodes=2), "--gres=gpu:3"),
        ("--gpus-per-node", Resources(gpus=4, nodes=2), "--gpus-per-node=2"),
        ("--gpus", Resources(gpus_per_node=2, nodes=2), "--gpus-per-node=2"),
    ],
)
def test_gpu_requests_are_exactly_what_was_asked(syntax, resources, expected):
    site = SITE.with_overrides(scheduler_keys={"gpu_request": syntax})
    assert expected in directives(JobSpec(["x"], resources=resources), site)


def test_an_uneven_split_over_per_node_syntax_is_refused_not_rounded():
    with pytest.raises(ConfigError, match="cannot be split evenly over 2 nodes"):
        site = SITE.with_overrides(scheduler_keys={"gpu_request": "--gres"})
        directives(JobSpec(["x"], resources=Resources(gpus=5, nodes=2)), site)
    with pytest.raises(ConfigError, match="disagree"):
        Resources(gpus=5, gpus_per_node=2, nodes=2)


def test_secrets_mean_no_requeue_and_arrays_can_be_capped():
    d = SlurmScheduler(SITE).directives(JobSpec(["x"], secrets={"A": "1"}), "/w/jobs/j1", 10, 3)
    assert "#SBATCH --no-requeue" in d and "#SBATCH --array=0-9%3" in d
    assert "--no-requeue" in directives(JobSpec(["x"], relay=True))  # a relay-only job (the hub's) too
    assert "--no-requeue" not in directives(JobSpec(["x"]))


def test_values_that_would_break_a_directive_are_refused():
    with pytest.raises(ConfigError, match="partition"):
        directives(JobSpec(["x"], resources=Resources(partition="gpu --uid=0")))


def test_job_ids_from_parsable_output():
    s = SlurmScheduler(SITE)
    assert s.job_ids("1234\n", None) == ["1234"]
    assert s.job_ids("1234;cluster\n", None) == ["1234;cluster"]  # the cluster stays with the id
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
    assert st["11"].state is JobState.FAILED and st["11"].reason == "OUT_OF_MEMORY"  # one word, however said
    assert st["11"].cause is EndCause.OUT_OF_MEMORY and st["7_0"].cause is None


async def test_a_job_killed_by_memory_polling_is_out_of_memory_from_its_accounting():
    """OverMemoryKill (jobacct_gather/linux) kills the step: squeue says FAILED, JobLaunchFailure, signal 9, as
    Slurm 22.05 on the test site does; sacct's steps show the peak that reached the allocation."""
    t = Replies(
        squeue=(0, "21|FAILED|JobLaunchFailure|9|node1|\n22|FAILED|NonZeroExitCode|9|node1|\n", ""),
        sacct=(
            0,
            "21||billing=1,cpu=1,mem=50M,node=1\n21.batch|211549K|\n21.extern|0|\n"
            "22||billing=2,cpu=2,mem=2G,node=2\n22.batch|900M|\n22.0|1000M|\n",
            "",
        ),
    )
    st = await SlurmScheduler(SITE).poll(t, [JobRef("21", "/d"), JobRef("22", "/d")])
    assert st["21"].state is JobState.FAILED and st["21"].signal == 9
    assert st["21"].reason.startswith("OUT_OF_MEMORY") and "207 MiB of the 50 MiB" in st["21"].reason
    assert st["21"].cause is EndCause.OUT_OF_MEMORY and st["22"].cause is None
    assert st["22"].reason == "NonZeroExitCode"  # 1000 MiB of 1024 per node: killed for another reason
    assert [c[0] for c in t.calls] == ["squeue", "sacct"] and "--jobs=21,22" in t.calls[1]
    # the batch shell outlived its payload's kill and wrote 137 (as it does on the test site for a pod's driver)
    t = Replies(
        squeue=(1, "", "slurm_load_jobs error: Invalid job id specified"),
        sacct=(0, "", ""),
        sh=(0, "/d/exitcode|137\nnow|100\n", ""),
    )
    t.outputs["sacct"] = (0, "23||billing=1,cpu=1,mem=50M,node=1\n23.batch|214402K|cpu=1,mem=50M,node=1\n", "")
    st = await SlurmScheduler(SITE).poll(t, [JobRef("23", "/d")])
    assert st["23"].exit_code == 137 and st["23"].cause is EndCause.OUT_OF_MEMORY, st["23"]


async def test_jobs_gone_from_the_queue_are_read_from_sacct_then_exit_code_files():
    t = Replies(
        squeue=(1, "", "slurm_load_jobs error: Invalid job id specified"),
        sacct=(0, "5|COMPLETED|0:0|n1\n6|CANCELLED by 1000|0:15|n1\n", ""),
        sh=(0, "/d/exitcode|2\nnow|100\n", ""),
    )
    st = await SlurmScheduler(SITE).poll(t, [JobRef("5", "/d"), JobRef("6", "/d"), JobRef("4", "/d")])
    assert st["5"].state is JobState.COMPLETED
    assert st["6"].state is JobState.CANCELLED
    assert (st["4"].state, st["4"].exit_code) == (JobState.FAILED, 2)


async def test_an_array_cancelled_before_any_task_ran_is_one_record_that_ends_every_task():
    """SLURM keeps a pending array as one record, ``82_[0-4]``, and a cancelled one stays that record in
    accounting: every task it stands for is CANCELLED, not UNKNOWN for ever (a shared site polled them for an
    hour)."""
    t = Replies(
        squeue=(0, "90_[2-3%1]|PENDING|JobArrayTaskLimit|0|||\n", ""),
        # Slurm 22.05 on the test site: a held array cancelled whole is "1024"; a part never split, "82_[...]"
        sacct=(0, "82_[0-2,4]|CANCELLED by 1000|0:0|None assigned\n82_3|COMPLETED|0:0|node1\n"
                  "1024|CANCELLED by 1001|0:0|\n", ""),
        sh=(0, "now|100\n", ""),
    )  # fmt: skip
    refs = [JobRef(f"82_{i}", "/d", i) for i in range(5)] + [JobRef("90_3", "/e", 3)]
    refs += [JobRef(f"1024_{i}", "/f", i) for i in range(3)]
    st = await SlurmScheduler(SITE).poll(t, refs)
    assert {i: st[f"82_{i}"].state for i in (0, 1, 2, 4)} == dict.fromkeys((0, 1, 2, 4), JobState.CANCELLED)
    assert st["82_3"].state is JobState.COMPLETED  # a task's own record wins
    assert {st[f"1024_{i}"].state for i in range(3)} == {JobState.CANCELLED}
    assert st["90_3"].state is JobState.PENDING
    sacct = next(call for call in t.calls if call[0] == "sacct")
    assert sacct[-1].endswith(",1024,82"), sacct  # the arrays' own records are asked for too


async def test_gone_from_the_queue_without_a_trace_is_unknown_not_failed():
    """A slow shared file system shows the exit code file late, and slurmdbd may be down: never guess."""
    t = Replies(squeue=(0, "", ""), sacct=(1, "", "sacct: error: Problem talking to the database"),
                sh=(0, "/d/exitcode||1000\nnow|5000\n", ""))  # fmt: skip
    scheduler = SlurmScheduler(SITE)
    for _ in range(2):
        st = await scheduler.poll(t, [JobRef("5", "/d")])
        assert st["5"].state is JobState.UNKNOWN
    assert [c[0] for c in t.calls].count("sacct") == 2  # one failed sacct does not disable sacct


async def test_without_accounting_sacct_is_asked_once_and_lost_jobs_end_after_a_while():
    t = Replies(squeue=(0, "", ""), sacct=(1, "", "Slurm accounting storage is disabled"),
                sh=(0, "/d/exitcode|0\n/e/exitcode||1000\nnow|1100\n", ""))  # fmt: skip
    scheduler = SlurmScheduler(SITE)
    for _ in range(3):
        st = await scheduler.poll(t, [JobRef("5", "/d"), JobRef("6", "/e")])
        assert st["5"].state is JobState.COMPLETED
        assert st["6"].state is JobState.UNKNOWN  # gone 100 s: maybe the file system is slow
    assert [c[0] for c in t.calls].count("sacct") == 1
    t.outputs["sh"] = (0, "/e/exitcode||1000\nnow|5000\n", "")
    st = await scheduler.poll(t, [JobRef("6", "/e")])
    assert st["6"].state is JobState.FAILED and "keeps no accounting" in st["6"].reason


async def test_status_queries_are_chunked_below_the_command_line_limit():
    t = Replies(squeue=(0, "", ""), sacct=(0, "", ""), sh=(0, "now|1\n", ""))
    refs = [JobRef(str(100000 + i), f"/d/{i}") for i in range(2500)]
    await SlurmScheduler(SITE).poll(t, refs)
    assert all(len(" ".join(call)) < 64 * 1024 for call in t.calls)
    assert [c[0] for c in t.calls].count("squeue") == 5


async def test_jobs_of_another_cluster_are_asked_there():
    t = Replies(
        squeue=(0, "77|RUNNING|None|0|n1|\n", ""), sacct=(0, "", ""), sh=(0, "now|1\n", ""), scancel=(0, "", "")
    )
    scheduler = SlurmScheduler(SITE)
    st = await scheduler.poll(t, [JobRef("77;c2", "/d"), JobRef("5", "/e")])
    assert st["77;c2"].state is JobState.RUNNING
    assert any("--clusters=c2" in call and "--jobs=77" in call for call in t.calls)
    await scheduler.cancel(t, [JobRef("77;c2", "/d")])
    assert t.calls[-1] == ["scancel", "--clusters=c2", "77"]


def test_hostlists_and_gpu_counts():
    from offload.schedulers.slurm import _gpu_count

    assert SlurmScheduler.first_host("node[3-5,7],gpu1") == "node3"
    assert SlurmScheduler.first_host("gpu[07-09]") == "gpu07"
    assert [_gpu_count(g) for g in ("gpu:2", "gpu:a100:4(S:0-1)", "gpu:1(IDX:0),shard:0", "(null)")] == [2, 4, 1, 0]


def test_the_profile_shebang_starts_the_script():
    import offload

    site = offload.Site(SITE.with_overrides(shebang="#!/bin/bash -l", runtime="none"))
    assert site.job_script(JobSpec(["true"])).startswith("#!/bin/bash -l\n#SBATCH ")


def test_the_job_id_is_found_among_a_site_wrappers_banner_lines():
    """Site wrappers print banners and quota warnings around sbatch's answer: the job is in, so its id counts."""
    s = SlurmScheduler(SITE)
    assert s.job_ids("Welcome to Leonardo\n\n1234\n", None) == ["1234"]
    assert s.job_ids("Welcome to Leonardo\n1234\nquota: 95% of 100 GB used\n", None) == ["1234"]
    assert s.job_ids("WARNING: project ends in 3 days\n1234;c2\n", None) == ["1234;c2"]
    assert s.job_ids("Submitted batch job 77\n", 2) == ["77_0", "77_1"]  # a wrapper that drops --parsable
    assert s.job_ids("Welcome\nSubmitted batch job 77 on cluster c2\n", None) == ["77;c2"]
    with pytest.raises(ValueError, match="instead of a job id") as err:
        s.job_ids("Welcome to Leonardo\nyour quota: 85 GB used\n", None)
    assert "Welcome to Leonardo" in str(err.value) and "85 GB used" in str(err.value)  # the whole output
    assert s.ids_in("Welcome to Leonardo\nyour quota: 85 GB\n1234\n\n77;c2\n") == ["1234", "77;c2"]


def test_the_secrets_sweep_reads_the_job_id_after_a_banner(tmp_path):
    """The sweep reads the jobid files the submission program writes (all of sbatch's output, banner included):
    a job that left the queue without starting loses its secrets file, a queued one keeps it."""
    import os
    import shlex
    import subprocess
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # only job 556 is still queued on this cluster, and 557 on cluster c2 (which this cluster's queue never lists)
    (bin_dir / "squeue").write_text('#!/bin/sh\ncase "$*" in *--clusters=c2*) echo 557 ;; *) echo 556 ;; esac\n')
    (bin_dir / "squeue").chmod(0o755)
    old = time.time() - 600
    for name, jobid in (
        ("gone", "Welcome to Leonardo\n555\n"),
        ("queued", "Welcome to Leonardo\n556\n"),
        ("elsewhere", "557;c2\n"),
        ("gone-there", "Submitted batch job 558 on cluster c2\n"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "jobid").write_text(jobid)
        (tmp_path / name / "secrets.env").write_text("export T=v\n")
        os.utime(tmp_path / name / "secrets.env", (old, old))
    (line,) = SlurmScheduler(SITE).sweep_lines(str(tmp_path))
    sweep = shlex.split(line)[3]  # the sweep itself, run here in the foreground: (setsid sh -c SWEEP ... &)
    subprocess.run(["sh", "-c", sweep], check=True, env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, timeout=30)
    assert not (tmp_path / "gone" / "secrets.env").exists()
    assert (tmp_path / "queued" / "secrets.env").exists()
    assert (tmp_path / "elsewhere" / "secrets.env").exists()  # queued on c2: asked there (--clusters)
    assert not (tmp_path / "gone-there" / "secrets.env").exists()


async def test_an_exit_code_file_ends_a_job_that_accounting_still_calls_running():
    """slurmctld lost the job (state loss) and slurmdbd is backlogged: sacct says RUNNING for ever. The job's own
    exit code file says it ended; without that file, accounting's word stands."""
    t = Replies(
        squeue=(0, "", ""),
        sacct=(0, "5|RUNNING|0:0|n1\n6|RUNNING|0:0|n1\n7|PENDING|0:0|\n", ""),
        sh=(0, "/d/exitcode|3\n/e/exitcode||1000\n/f/exitcode|0\nnow|1100\n", ""),
    )
    st = await SlurmScheduler(SITE).poll(t, [JobRef("5", "/d"), JobRef("6", "/e"), JobRef("7", "/f")])
    assert (st["5"].state, st["5"].exit_code) == (JobState.FAILED, 3)
    assert st["6"].state is JobState.RUNNING  # no file yet: still running as far as anyone knows
    assert (st["7"].state, st["7"].exit_code) == (JobState.COMPLETED, 0)
    assert [c[0] for c in t.calls] == ["squeue", "sacct", "sh"]  # one call each
