"""The README's commands run as written: every block marked ``<!-- readme-test: local -->`` or
``<!-- readme-test: testsite -->``, in a fresh virtualenv made from a copy of the checkout (as a newcomer's
clone), in the order the README gives them. Only the test command itself (``tox``) is left out: it is what runs
this test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
TOX = re.compile(r"(^|[;&|]\s*)(python3 -m pip install 'tox|tox$)")  # the test command itself
MARK = re.compile(r"^( *)<!-- readme-test: (local|testsite) -->\n\1```(bash|python)\n(.*?)^\1```", re.M | re.S)


def blocks() -> list[tuple[str, str, str]]:
    """``(where, language, code)`` of each marked block, indentation removed."""
    found = []
    for indent, where, language, body in MARK.findall((REPO / "README.md").read_text()):
        code = "\n".join(line[len(indent) :] for line in body.splitlines())
        found.append((where, language, code))
    return found


def checkout_copy(target: Path) -> Path:
    """The files git tracks, as a fresh clone would have them (no .venv, no .tox, no caches)."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    return target


def test_the_readme_blocks_are_found():
    where = [w for w, _, _ in blocks()]
    assert where.count("local") >= 3 and where.count("testsite") >= 1


@pytest.mark.timeout(1800)
def test_the_readmes_commands_run_as_written(tmp_path, testsite_config):
    clone = checkout_copy(tmp_path / "offload")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OFFLOAD", "VIRTUAL_ENV", "AIRFLOW"))}
    env.update(HOME=str(home), PATH="/usr/local/bin:/usr/bin:/bin", OFFLOAD_STATE_DIR=str(tmp_path / "state"),
               XDG_CONFIG_HOME=str(home / ".config"), PIP_DISABLE_PIP_VERSION_CHECK="1")  # fmt: skip
    python = Path(sys.base_prefix) / "bin" / "python3"  # the interpreter a newcomer has, not a test env
    env["PATH"] = f"{python.parent}:{env['PATH']}"
    state = ""  # what earlier blocks set up (the venv, exported variables) carries over, as in one shell
    for number, (where, language, code) in enumerate(blocks()):
        if language == "python":
            script = tmp_path / f"block{number}.py"
            script.write_text(code)
            lines = [f"python {script}"]
        else:
            lines = [line for line in code.splitlines() if not TOX.search(line)]
        program = "\n".join(["set -euo pipefail", state, *lines, 'declare -px > "$OFFLOAD_README_STATE"'])
        state_file = tmp_path / "state.sh"
        run_env = {**env, "OFFLOAD_README_STATE": str(state_file)}
        result = subprocess.run(["bash", "-c", program], cwd=clone, env=run_env, capture_output=True, text=True,
                                timeout=1500)  # fmt: skip
        assert result.returncode == 0, (
            f"README block {number} ({where}) failed:\n{code}\n--- stdout\n{result.stdout[-4000:]}\n"
            f"--- stderr\n{result.stderr[-4000:]}"
        )
        state = "\n".join(line for line in state_file.read_text().splitlines()
                          if not line.startswith(("declare -r", "declare -ir", "declare -ar")))  # fmt: skip
        if "hello from a job" in code:
            assert "hello from a job" in result.stdout
        if "multinode_allreduce" in code:
            assert result.stdout.count("sum 3") == 2
