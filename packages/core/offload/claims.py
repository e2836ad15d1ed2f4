"""The claim: how a job submitted to several sites at once runs its payload exactly once.

A placement that races a job (``offload.placement``) submits one *attempt* per site. Each attempt's batch
script starts with a gate: once its node is allocated, it waits for the client's decision before the payload
(and before it reads its secrets). The decision is one symbolic link in the attempt's directory,
``decision`` (:data:`offload.jobfiles.DECISION`), whose target is a word:

* ``claim``: the client chose this attempt; the gate lets the payload run.
* ``release``: this attempt lost (another site's started first, or the placement gave it up); the gate removes
  its secrets and ends the job with :data:`RELEASED_EXIT`, the payload never started.

Creating a symbolic link is atomic and fails if the name exists, on local and network file systems alike, so
whoever creates it first decides, and the other side reads what was decided. The client creates ``claim`` for
one attempt, ``release`` for the others; the gate itself creates ``release`` when no decision came within its
wait (a client that died and never came back), so an attempt never holds its nodes forever, and a client that
comes back late reads ``release`` and knows that attempt never ran. Neither side can overwrite the other: no
attempt runs its payload without a ``claim``, and the client writes a ``claim`` for a second attempt only after
the first read ``release``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from offload.errors import ConfigError
from offload.jobfiles import DECISION, SECRETS
from offload.transports.base import Transport

CLAIM = "claim"
RELEASE = "release"
RELEASED_EXIT = 93  # the exit code of an attempt that was released (its payload never ran)
DEFAULT_WAIT = 600  # seconds a started attempt waits for its decision before it releases itself


@dataclass(frozen=True)
class Gate:
    """What the submission of one attempt needs: the directory the placement chose for it (recorded before it is
    submitted, so a restarted client finds the attempt even if it never learnt its id) and how long the attempt
    waits for a decision once it starts."""

    jobdir: str
    wait: int = DEFAULT_WAIT

    def __post_init__(self) -> None:
        if not isinstance(self.wait, int) or self.wait < 1:
            raise ConfigError(f"a claim's wait is a whole number of seconds, at least 1; got {self.wait!r}")


def gate_lines(wait: int) -> list[str]:
    """The batch script's gate (after it is in its directory, before its secrets): wait up to ``wait`` seconds
    for the decision, release itself if none came, and end without the payload unless it was claimed."""
    decision = f'"$OFFLOAD_JOB_DIR/{DECISION}"'
    return [
        "offload_waited=0",
        f"while [ ! -L {decision} ]; do",
        f"    if [ $offload_waited -ge {int(wait)} ]; then ln -sT {RELEASE} {decision} 2>/dev/null; break; fi",
        "    sleep 1; offload_waited=$((offload_waited + 1))",
        "done",
        f'if [ "$(readlink {decision})" != {CLAIM} ]; then',
        "    echo \"offload: this attempt was released (another site's attempt of the job runs it, or no claim came"
        f' in {int(wait)} s): not running the payload" >&2',
        f'    rm -f "$OFFLOAD_JOB_DIR/{SECRETS}"*',
        f"    exit {RELEASED_EXIT}",
        "fi",
        "unset offload_waited",
    ]


async def decision(transport: Transport, jobdir: str) -> str:
    """The decision of the attempt in ``jobdir`` as it stands, writing nothing: :data:`CLAIM`, :data:`RELEASE`,
    or '' (none yet, or the directory is gone)."""
    path = shlex.quote(f"{jobdir}/{DECISION}")
    result = await transport.run(["sh", "-c", f"readlink {path} || true"], check=False, timeout=60)
    return result.stdout.strip()


async def decide(transport: Transport, jobdir: str, word: str) -> str:
    """Write ``word`` (:data:`CLAIM` or :data:`RELEASE`) as the decision of the attempt in ``jobdir`` unless one
    is there already, in one command; return the decision that holds (``word`` if this call made it, what the
    other side decided otherwise, '' if the directory is gone)."""
    if word not in (CLAIM, RELEASE):
        raise ValueError(f"a decision is {CLAIM!r} or {RELEASE!r}, not {word!r}")
    path = shlex.quote(f"{jobdir}/{DECISION}")
    script = f"ln -sT {word} {path} 2>/dev/null; readlink {path} || true"
    result = await transport.run(["sh", "-c", script], check=False, timeout=60)
    return result.stdout.strip()
