"""The batch script every scheduler submits: directives, then one fixed body.

The body is the same for every scheduler and runtime, so what runs on a node is predictable::

    #!/bin/bash
    #SBATCH ...                      <- the scheduler's directives
    export OFFLOAD_JOB_DIR=...       <- the job's 0700 directory on the site
    cd "$OFFLOAD_JOB_DIR"
    module load apptainer            <- the site's setup lines
    export NAME='value'              <- env (never secrets)
    . "$OFFLOAD_JOB_DIR/secrets.env" <- secrets, from a 0600 file written over SSH stdin
    export APPTAINERENV_NAME=...     <- the runtime's prelude
    apptainer exec ... image argv    <- the payload, every word quoted
    echo $? > exitcode               <- the payload's exit code, exactly, whatever accounting the site has

Plugins may change a :class:`BatchScript` through the ``offload_job_script`` hook before it is rendered.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field


@dataclass
class BatchScript:
    directives: list[str] = field(default_factory=list)
    jobdir: str = ""
    task_index: str = ""  # shell expression of the array task index, '' when the scheduler has no arrays
    index_value: str | None = None  # OFFLOAD_TASK_INDEX for schedulers without arrays (one job per task)
    setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    prelude: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    comment: str = ""

    def render(self) -> str:
        lines = ["#!/bin/bash", *self.directives]
        if self.comment:
            lines.append(f"# {self.comment}")
        lines += [
            f"export OFFLOAD_JOB_DIR={shlex.quote(self.jobdir)}",
            f'offload_array_index="{self.task_index}"',
            "export OFFLOAD_TASK_INDEX="
            + (shlex.quote(self.index_value) if self.index_value is not None else '"$offload_array_index"'),
            'cd "$OFFLOAD_JOB_DIR" || exit 97',
            *self.setup,
            *(f"export {name}={shlex.quote(value)}" for name, value in self.env.items()),
            'if [ -f "$OFFLOAD_JOB_DIR/secrets.env" ]; then . "$OFFLOAD_JOB_DIR/secrets.env"; fi',
            *self.prelude,
            shlex.join(self.command),
            "offload_status=$?",
            "printf '%s\\n' \"$offload_status\" \\",
            '    > "$OFFLOAD_JOB_DIR/exitcode${offload_array_index:+.$offload_array_index}"',
            'exit "$offload_status"',
        ]
        return "\n".join(lines) + "\n"


def secrets_file(secrets: dict[str, str]) -> str:
    """The body of ``secrets.env``: quoted exports, sourced by the batch script."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in secrets.items())
