"""What exit waits for: work kept past its caller (an interrupted submission, whose jobs must be cancelled once
known) ends before the process does, even when it was kept a moment after the main thread began to exit."""

from __future__ import annotations

import subprocess
import sys

PROGRAM = """
import asyncio, atexit
from offload import _loop

_loop.CLEANUP_BUDGET = 0.2  # an exit that does not wait for kept work leaves after 0.2-0.4 s


async def work():
    await asyncio.sleep(2)
    print("the kept work ended", flush=True)


async def submission():  # as Submitter.submit_many: interrupted, it keeps what must still happen
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        _loop.keep(work())
        raise


running = _loop.spawn(submission())
# As the CLI's Ctrl-C: the main thread cancels, then exits at once. This handler runs just before offload's own
# (registered earlier, so run later); the I/O thread keeps the work a moment after.
atexit.register(running.cancel)
"""


def test_work_kept_just_after_exit_began_is_still_waited_for():
    """The I/O thread keeps the work only once it learns of the cancellation, after the main thread already
    began to exit: exit must not size its wait from what was kept when it began (it did, and the CLI then left
    before saying it cancelled the job that got in)."""
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "the kept work ended" in result.stdout, result.stderr
