"""The submission program and its all-or-nothing rule, with the transport stubbed at its seam (the real thing
runs against SLURM in tests/integration/test_secrets_and_limits.py)."""

from __future__ import annotations

import re
import subprocess

import pytest

from offload import JobSpec, SubmissionError, TransportError
from offload.config import SiteConfig
from offload.schedulers.slurm import SlurmScheduler
from offload.submit import Submission, program, send
from offload.transports.base import CommandResult

SITE = SiteConfig(name="hpc", host="h")


def submissions(n: int, secrets: bool = False) -> list[Submission]:
    return [Submission(JobSpec(["true", str(i)]), f"/w/jobs/j{i}", "#!/bin/bash\ntrue\n", None,
                       secrets={"T": "v"} if secrets else {}) for i in range(n)]  # fmt: skip


class Lanes:
    """Answers each submission program like a site would: every job gets an id, one lane's channel dies."""

    def __init__(self, dying_lane: int | None = None) -> None:
        self.dying_lane = dying_lane
        self.lane = 0
        self.cancelled: list[str] = []
        self.calls: list[list[str]] = []

    async def run(self, argv, *, input=None, check=True, timeout=None):
        self.calls.append(list(argv))
        if argv[0] == "scancel":
            self.cancelled += argv[1:]
            return CommandResult(tuple(argv), 0, "", "")
        if argv[0] != "bash":
            return CommandResult(tuple(argv), 0, "", "")
        lane, self.lane = self.lane, self.lane + 1
        if lane == self.dying_lane:
            raise TransportError("connection lost while running 'bash'")
        numbers = [int(n) for n in re.findall(r'printf "OFFLOAD_SUBMIT (\d+) 0', input)]
        out = "".join(f"OFFLOAD_SUBMIT {n} 0 {1000 + n}\n" for n in numbers)
        return CommandResult(tuple(argv), 0, out, "")


async def test_a_lost_channel_cancels_what_the_other_channels_got_in():
    transport, subs = Lanes(dying_lane=1), submissions(100)
    with pytest.raises(TransportError, match="connection lost"):
        await send(transport, SlurmScheduler(SITE), "hpc", subs, "/w/jobs", lanes=4)
    got_in = {str(1000 + n) for n in range(100) if n % 4 != 1}
    assert got_in <= set(transport.cancelled)  # the three lanes that answered: every one of their jobs
    lost_lane = {f"/w/jobs/j{n}/jobid" for n in range(1, 100, 4)}
    assert any(call[:2] == ["sh", "-c"] and lost_lane <= set(call) for call in transport.calls)  # and the lost lane's
    assert all(not sub.ids for sub in subs)


async def test_a_refusal_in_one_job_cancels_the_others():
    class Refusing(Lanes):
        async def run(self, argv, *, input=None, check=True, timeout=None):
            result = await super().run(argv, input=input, check=check, timeout=timeout)
            if argv[0] == "bash":
                out = result.stdout.replace("OFFLOAD_SUBMIT 1 0 1001\n", "OFFLOAD_SUBMIT 1 1\nsbatch: error: "
                                            "QOSMaxSubmitJobPerUserLimit\n\nOFFLOAD_SUBMIT_END 1\n")  # fmt: skip
                return CommandResult(result.argv, 0, out, "")
            return result

    transport = Refusing()
    with pytest.raises(SubmissionError, match="MaxSubmitJobs") as err:
        await send(transport, SlurmScheduler(SITE), "hpc", submissions(3), "/w/jobs", lanes=1)
    assert "QOSMaxSubmitJobPerUserLimit" in err.value.scheduler_message
    assert sorted(transport.cancelled) == ["1000", "1002"]


def test_the_program_checks_every_write_and_writes_no_secret_twice(tmp_path):
    """Run the real program with bash and a fake sbatch; the first job's script cannot be written (a directory
    is in its place, which fails even for root), so nothing may be submitted."""
    jobs = tmp_path / "jobs"
    text = program(list(enumerate(submissions(2, secrets=True))), "/w/jobs", SlurmScheduler(SITE))
    assert text.count("export T=v") == 2  # once per job, in its own secrets file
    text = text.replace("/w/jobs", str(jobs)).replace("mkdir -m 700", "mkdir -p -m 700")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho 42\n")
    (fake / "sbatch").chmod(0o755)
    (jobs / "j0" / "job.sh").mkdir(parents=True)
    result = subprocess.run(["bash", "-s"], input=text, capture_output=True, text=True,
                            env={"PATH": f"{fake}:/usr/bin:/bin"})  # fmt: skip
    assert f"OFFLOAD_SUBMIT_FAIL {jobs}/j0/job.sh" in result.stdout
    assert "Is a directory" in result.stderr
    assert "OFFLOAD_SUBMIT 0 0" not in result.stdout and "OFFLOAD_SUBMIT 1 0" not in result.stdout


async def test_a_banner_before_the_job_id_is_not_a_refusal(tmp_path, monkeypatch):
    """The real program, run here by bash, with an sbatch wrapper that greets first (as on Leonardo): the job
    got in, so its id is read past the banner instead of the submission being reported refused."""
    from offload.transports.local import LocalTransport

    fake = tmp_path / "bin"
    fake.mkdir()
    scripts = {
        "sbatch": "#!/bin/sh\ncat > /dev/null\necho 'Welcome to Leonardo'\necho\necho 4242\n",
        "squeue": "#!/bin/sh\n",  # the program's secrets sweep asks; nothing is queued here
        "scancel": f'#!/bin/sh\necho "$@" >> {tmp_path}/cancelled\n',
    }
    for name, text in scripts.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    jobs = tmp_path / "jobs"
    subs = [Submission(JobSpec(["true"]), f"{jobs}/j0", "#!/bin/bash\ntrue\n", None, secrets={"T": "v"}),
            Submission(JobSpec(["true"]), f"{jobs}/j1", "#!/bin/bash\ntrue\n", 3)]  # fmt: skip
    await send(LocalTransport(), SlurmScheduler(SITE), "hpc", subs, str(jobs), lanes=1)
    assert subs[0].ids == ["4242"] and subs[1].ids == ["4242_0", "4242_1", "4242_2"]
    assert not (tmp_path / "cancelled").exists()


class Unanswered(Lanes):
    """The dying lane's program went on after its channel was lost: its sbatch got two jobs in, whose jobid
    files were still empty when they were read at once. squeue lists them, by their job directories."""

    def __init__(self, ended: bool = True) -> None:
        super().__init__(dying_lane=1)
        self.ended = ended

    async def run(self, argv, *, input=None, check=True, timeout=None):
        if any("squeue" in part for part in argv):
            self.calls.append(list(argv))
            out = "2001|/w/jobs/j1|\n2005|/w/jobs/j5|\n1002|/w/jobs/j2|\n999|/elsewhere/j1|\n"
            return CommandResult(tuple(argv), 0, out, "")
        if argv[0] == "sh" and any(part.endswith("/jobid") for part in argv):
            self.calls.append(list(argv))
            return CommandResult(tuple(argv), 0, f"ended {int(self.ended)}\n", "")
        return await super().run(argv, input=input, check=check, timeout=timeout)


async def test_after_a_lost_channel_the_queue_is_asked_once_what_got_in():
    transport, subs = Unanswered(), submissions(100)
    with pytest.raises(TransportError, match="connection lost") as err:
        await send(transport, SlurmScheduler(SITE), "hpc", subs, "/w/jobs", lanes=4)
    squeues = [call for call in transport.calls if any("squeue" in part for part in call)]
    assert len(squeues) == 1  # one squeue for the whole batch, not one per job
    waits = [i for i, call in enumerate(transport.calls) if call[0] == "sh" and "/w/jobs/j1/jobid" in call]
    assert waits and waits[0] < transport.calls.index(squeues[0])  # it asks once the lost program has ended
    assert "/w/jobs/j1/.submission-ended" in transport.calls[waits[0]]  # the lost lane's own end mark
    assert {"2001", "2005"} <= set(transport.cancelled) and "999" not in transport.cancelled
    message = str(err.value)
    assert "2001" in message and "2005" in message and "cancelled" in message


async def test_a_submission_program_still_running_after_the_wait_is_said_so():
    transport = Unanswered(ended=False)
    with pytest.raises(TransportError, match="no end mark within 60 s") as err:
        await send(transport, SlurmScheduler(SITE), "hpc", submissions(100), "/w/jobs", lanes=4)
    assert "/w/jobs" in str(err.value) and {"2001", "2005"} <= set(transport.cancelled)
    assert "left queued" not in str(err.value).lower()  # it cannot know: it does not say so


@pytest.mark.parametrize("scheduler", ["slurm", "gridengine"])
def test_a_program_whose_channel_goes_cancels_what_it_sent(tmp_path, scheduler):
    """The real program, run here by bash, loses its channel while its submit command is in flight (the client
    was killed, or gave up waiting): at its next report it finds stdout gone and cancels the jobs it sent, so no
    job is left that nobody will cancel. A program that ends normally cancels nothing (the banner test)."""
    from offload.schedulers.gridengine import GridEngineScheduler

    fake = tmp_path / "bin"
    fake.mkdir()
    submit, cancel = ("sbatch", "scancel") if scheduler == "slurm" else ("qsub", "qdel")
    answers = {"sbatch": ["4242", "4243"], "qsub": ["4242", "4243.1-3:1"]}[submit]
    scripts = {
        # the first answers at once; the second is slow, and the channel goes meanwhile
        submit: f"#!/bin/sh\nn=$(ls {tmp_path}/sent 2>/dev/null | wc -l); touch {tmp_path}/sent/$n\n"
        f'[ "$n" = 1 ] && sleep 1\n[ "$n" = 0 ] && echo {answers[0]} || echo {answers[1]}\n',
        "squeue": "#!/bin/sh\n",
        "qstat": "#!/bin/sh\n",
        cancel: f'#!/bin/sh\necho "$@" >> {tmp_path}/cancelled\n',
    }
    (tmp_path / "sent").mkdir()
    for name, text in scripts.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    jobs = tmp_path / "jobs"
    site = SiteConfig(name="hpc", host="h", scheduler=scheduler)
    plugin = SlurmScheduler(site) if scheduler == "slurm" else GridEngineScheduler(site)
    subs = [Submission(JobSpec(["true"]), f"{jobs}/j0", "#!/bin/bash\ntrue\n", None),
            Submission(JobSpec(["true"]), f"{jobs}/j1", "#!/bin/bash\ntrue\n", 3)]  # fmt: skip
    text = program(list(enumerate(subs)), str(jobs), plugin)
    proc = subprocess.Popen(["bash", "-s"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={"PATH": f"{fake}:/usr/bin:/bin"}, text=True)  # fmt: skip
    proc.stdin.write(text)
    proc.stdin.close()
    while "OFFLOAD_SUBMIT_END 0" not in proc.stdout.readline():  # the first job's report came...
        pass
    proc.stdout.close()  # ...then the channel went, with the second submission in flight
    assert proc.wait(timeout=30) == 141
    assert (tmp_path / "cancelled").read_text().split() == ["4242", "4243"]
    if scheduler == "gridengine":  # qdel'd while pending leaves no accounting record: its marks say it
        assert sorted(p.name for p in (jobs / "j1").glob("cancelled*")) == [
            f"cancelled{s}" for s in ("", ".0", ".1", ".2")
        ]
    assert (jobs / "j0" / ".submission-ended").exists()
