"""The batch script every scheduler submits: directives, then one fixed body.

The body is the same for every scheduler and runtime, so what runs on a node is predictable::

    #!/bin/bash
    #SBATCH ...                      <- the scheduler's directives
    export OFFLOAD_JOB_DIR=...       <- the job's 0700 directory on the site
    cd "$OFFLOAD_JOB_DIR"
    (a raced attempt: wait for its claim) <- offload.claims: the payload of a raced job runs once
    . "$OFFLOAD_JOB_DIR/secrets.env" <- secrets, from a 0600 file written over SSH stdin, removed once read
    module load apptainer            <- the site's setup lines
    export NAME='value'              <- env (never secrets)
    export APPTAINERENV_NAME=...     <- the runtime's prelude
    apptainer exec ... image argv    <- the payload, every word quoted
    echo $? > exitcode               <- the payload's exit code, exactly, whatever accounting the site has

A job on several nodes (or with several tasks per node) starts the payload once per task with the scheduler's
launcher (``srun``), each copy in its own container and told ``RANK``, ``NODE_RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; its output lines carry ``[node:rank]``.

Plugins may change a :class:`BatchScript` through the ``offload_job_script`` hook before it is rendered.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from offload.claims import gate_lines
from offload.jobfiles import COPIES, EXIT_CODE, SECRETS


@dataclass
class BatchScript:
    shebang: str = "#!/bin/bash"
    directives: list[str] = field(default_factory=list)
    jobdir: str = ""
    task_index: str = ""  # shell expression of the array task index, '' when the scheduler has no arrays
    index_value: str | None = None  # OFFLOAD_TASK_INDEX for schedulers without arrays (one job per task)
    index_offset: int = 0  # added to the array index (an array that continues another: MaxArraySize)
    secrets: bool = False  # the job has a secrets file to read (and remove) before anything else runs
    setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    prelude: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    comment: str = ""
    # Several copies (multi-node jobs): the scheduler's argv that starts one copy per task, the variables each
    # copy is told (shell expressions), and the expression naming the first node (MASTER_ADDR).
    launcher: list[str] = field(default_factory=list)
    copy_env: dict[str, str] = field(default_factory=dict)
    first_node: str = ""
    # reach: the relay program, its socket name, and how to run Python in the container if the node has none
    reach_source: str = ""
    reach_key: str = ""
    reach_container_python: list[str] = field(default_factory=list)
    image_path: str = ""  # the image, when it is a path on the site: checked on the node before the container
    claim_wait: int = 0  # a raced attempt: seconds it waits for its claim before anything else (offload.claims)

    def render(self) -> str:
        lines = [self.shebang, *self.directives]
        if self.comment:
            lines.append(f"# {self.comment}")
        if self.index_value is not None:
            task_index = shlex.quote(self.index_value)
        elif self.index_offset:
            task_index = f'"$((${{offload_array_index:-0}} + {self.index_offset}))"'
        else:
            task_index = '"$offload_array_index"'
        lines += [
            f"export OFFLOAD_JOB_DIR={shlex.quote(self.jobdir)}",
            f'offload_array_index="{self.task_index}"',
            f"export OFFLOAD_TASK_INDEX={task_index}",
            'cd "$OFFLOAD_JOB_DIR" || exit 97',
        ]
        if self.claim_wait:
            lines += gate_lines(self.claim_wait)
        if self.secrets:
            lines += self._secrets()
        lines += [
            *self.setup,
            *(f"export {name}={shlex.quote(value)}" for name, value in self.env.items()),
        ]
        if self.image_path:
            image = shlex.quote(self.image_path)
            lines += [
                f"if [ ! -e {image} ]; then",
                f'    echo "offload: cannot start the container: the image {image} is not on node $(hostname)" >&2',
                "    exit 94",
                "fi",
            ]
        if self.reach_source:
            lines += self._reach()
        lines += self._copies() if self.launcher else [*self.prelude, shlex.join(self.command), "offload_status=$?"]
        lines += [
            "printf '%s\\n' \"$offload_status\" \\",
            f'    > "$OFFLOAD_JOB_DIR/{EXIT_CODE}${{offload_array_index:+.$offload_array_index}}"',
            'exit "$offload_status"',
        ]
        return "\n".join(lines) + "\n"

    def _secrets(self) -> list[str]:
        """Read the job's own secrets file, then remove it: after this line the secrets live only in this
        job's processes. A missing or incomplete file (a full disk when it was written) stops the job here."""
        return [
            f'offload_secrets="$OFFLOAD_JOB_DIR/{SECRETS}${{offload_array_index:+.$offload_array_index}}"',
            'if [ ! -f "$offload_secrets" ]; then',
            "    echo \"offload: this job's secrets file $offload_secrets is missing (removed after a first start?):"
            ' not running the payload" >&2',
            "    exit 95",
            "fi",
            '. "$offload_secrets"',
            'rm -f "$offload_secrets"',
            'if [ "${offload_secrets_complete:-}" != 1 ]; then',
            "    echo 'offload: the secrets file was incomplete (a full disk when it was written?): not running the"
            " payload' >&2",
            "    exit 95",
            "fi",
            "unset offload_secrets offload_secrets_complete",
        ]

    def _reach(self) -> list[str]:
        """Start the reach relay on this node (its targets come in the secrets as OFFLOAD_REACH) and take the
        variables it gives the payload; the relay ends with this script."""
        fallback = shlex.join(self.reach_container_python) if self.reach_container_python else "false"
        key = shlex.quote(self.reach_key) + "${offload_array_index:+-$offload_array_index}"
        return [
            f"offload_reach_source={shlex.quote(self.reach_source)}",
            'offload_reach_python() { if command -v python3 >/dev/null 2>&1; then python3 "$@"; '
            f'else {fallback} "$@"; fi; }}',
            "coproc OFFLOAD_RELAY { printf '%s\\n' \"$OFFLOAD_REACH\" | "
            f'offload_reach_python -c "$offload_reach_source" serve {key} "$$"; }}',
            "offload_reach_ready=",
            'while IFS= read -r -u "${OFFLOAD_RELAY[0]}" offload_line; do',
            '    if [ "$offload_line" = offload-reach-ready ]; then offload_reach_ready=1; break; fi',
            '    eval "$offload_line"',
            "done",
            "unset OFFLOAD_REACH offload_reach_source",
            'if [ -z "$offload_reach_ready" ]; then',
            "    echo 'offload: the reach relay did not start: it needs python3 on the node or in the image' >&2",
            "    exit 96",
            "fi",
        ]

    def _copies(self) -> list[str]:
        """One copy per task, each in its own container, its output prefixed ``[node:rank]``; the job ends with
        the exit code of the copy that failed first (the others were stopped because of it)."""
        task = "\n".join([
            *(f'export {name}="{expression}"' for name, expression in self.copy_env.items()),
            *self.prelude,
            "set -o pipefail",
            f'{shlex.join(self.command)} 2>&1 | sed -u "s/^/[$(hostname -s):$RANK] /"',
            "rc=$?",
            'printf "%s %s %s %s\\n" "$rc" "$(hostname -s)" "$(date +%s.%N)" "$RANK" > "$offload_copies/$RANK"',
            'exit "$rc"',
        ])  # fmt: skip
        return [
            f'offload_copies="$OFFLOAD_JOB_DIR/{COPIES}${{offload_array_index:+.$offload_array_index}}"',
            'mkdir -p "$offload_copies" || exit 97',
            "export offload_copies",
            f"offload_first={self.first_node}",
            'export MASTER_ADDR="${MASTER_ADDR:-$(getent ahostsv4 "$offload_first" | awk \'NR == 1 {print $1}\')}"',
            'export MASTER_ADDR="${MASTER_ADDR:-$offload_first}"',
            # A port free on this (the first) node, picked without python: the first one /proc/net lists unused.
            "offload_port=$((20000 + ${SLURM_JOB_ID:-$$} % 20000))",
            'while grep -qi ":$(printf %04X "$offload_port") " /proc/net/tcp /proc/net/tcp6 2>/dev/null; do '
            "offload_port=$((offload_port + 1)); done",
            'export MASTER_PORT="${MASTER_PORT:-$offload_port}"',
            f"{shlex.join(self.launcher)} bash -c {shlex.quote(task)}",
            "offload_status=$?",
            'if [ "$offload_status" != 0 ]; then',
            "    offload_failed=$(cat \"$offload_copies\"/* 2>/dev/null | awk '$1 != 0' | sort -g -k3 | head -n 1)",
            '    if [ -n "$offload_failed" ]; then',
            '        read -r offload_status offload_node offload_time offload_rank <<< "$offload_failed"',
            "        printf 'offload: copy %s on %s failed first, with exit code %s; the other copies were stopped\\n' "
            '"$offload_rank" "$offload_node" "$offload_status"',
            "    fi",
            "fi",
        ]


def secrets_file(secrets: dict[str, str]) -> str:
    """The body of ``secrets.env``: quoted exports, sourced by the batch script, and a last line that says the
    file is whole (a write cut short by a full disk misses it, and the job refuses to run)."""
    exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in secrets.items())
    return exports + "offload_secrets_complete=1\n"
