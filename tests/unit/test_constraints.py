"""Every install from the clone agrees on the versions a client and the site's image share (constraints.txt):
the README's install commands, and tox's envs, whose Python builds the test site's image (scripts/testsite,
``client_pins``). Without it a release on PyPI between two installs split them: a CI run's README test got
distributed 2026.11.0 while the site's image, built by the integration env an hour earlier, had 2026.8.0, and
``OffloadCluster`` refused to start (``VersionMismatchError``)."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).parents[2]


def pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{line}: constraints.txt pins exact versions"
            found[requirement.name] = spec.version
    return found


def test_distributed_and_dask_are_pinned_together_with_jupyterhub():
    pinned = pins()
    assert pinned["distributed"] == pinned["dask"]  # distributed requires its own dask release
    assert "jupyterhub" in pinned  # the single-user servers in the image run at the hub's version


def test_the_readmes_installs_from_the_clone_and_tox_use_the_constraints():
    installs = re.findall(r"pip install -e '[^']*'[^\n`#]*", (REPO / "README.md").read_text())
    assert installs, "the README installs from the clone"
    assert all("-c constraints.txt" in line for line in installs), installs
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(REPO / "tox.ini")
    assert "-c {toxinidir}/constraints.txt" in tox["testenv"]["install_command"]
