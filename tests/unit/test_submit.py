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
