"""The one cache of sites per process: same config, same Site; a changed profile, a new one; every site it
made closed at exit, and a closed one never handed out again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import offload
from offload import _loop
from offload.site import _SITES


@pytest.fixture
def profiles(tmp_path, monkeypatch) -> Iterator[object]:
    """A sites file with one SSH site (nothing connects: a Site connects on first use), and the sites the test
    made, closed after it (only those: other tests' sites stay)."""
    file = tmp_path / "sites.toml"
    monkeypatch.setenv("OFFLOAD_CONFIG", str(file))

    def write(partition: str = "cpu") -> None:
        file.write_text(f'[sites.hpc]\nhost = "127.0.0.1"\nport = 1\nuser = "me"\npartition = "{partition}"\n')

    write()
    before = set(map(id, _SITES._sites))
    yield write
    for site in [s for s in _SITES._sites if id(s) not in before]:
        site.close()


def test_two_loads_share_one_site_and_a_changed_profile_gives_a_new_one(profiles):
    first = offload.load_site("hpc")
    assert offload.load_site("hpc") is first
    assert offload.shared_site(first.config) is first  # an adapter with the same config gets the same Site
    profiles(partition="gpu")
    changed = offload.load_site("hpc")
    assert changed is not first and changed.config.partition == "gpu"
    profiles(partition="cpu")
    assert offload.load_site("hpc") is first  # the same values again: the same Site


def test_another_account_on_the_same_site_is_a_site_of_its_own(profiles):
    config = offload.load_profiles().get("hpc")
    alice = offload.shared_site(config.with_overrides(user="alice"))
    assert offload.shared_site(config.with_overrides(user="alice")) is alice
    assert offload.shared_site(config.with_overrides(user="bob")) is not alice


def test_a_closed_site_is_not_handed_out_again(profiles):
    site = offload.load_site("hpc")
    site.close()
    again = offload.load_site("hpc")
    assert again is not site and not again._closed


def test_the_exit_hook_closes_every_site_it_made_and_never_raises(profiles, monkeypatch):
    site = offload.load_site("hpc")
    profiles(partition="gpu")
    replaced = offload.load_site("hpc")  # the old profile's site is still someone's: closed at exit too
    other = offload.shared_site(site.config.with_overrides(user="bob"))

    async def broken() -> None:
        raise OSError("the connection broke while closing")

    monkeypatch.setattr(other, "_close", broken)
    # this test's sites only: other tests' sites in this process stay open
    monkeypatch.setattr(_SITES, "_sites", [s for s in _SITES._sites if s in (site, replaced, other)])
    assert _loop.loop() is not None  # the hook runs on offload's I/O loop, as at exit
    assert _loop._cleanups.count(_SITES.close_all) == 1
    _loop.run(_SITES.close_all())  # what interpreter exit runs; the broken one is logged, the rest closed
    assert site._closed and replaced._closed
    assert site.transport._closed and replaced.transport._closed  # type: ignore[attr-defined]
    assert all(s not in _SITES._sites for s in (site, replaced, other))
    assert offload.load_site("hpc") is not replaced  # after the hook: a new one, never a closed one


def test_the_hub_spawner_uses_the_shared_sites(profiles):
    pytest.importorskip("jupyterhub")
    from jupyterhub_offload.spawner import site_for

    assert site_for("hpc", None, None) is offload.load_site("hpc")
    alice = site_for("hpc", "alice", "/keys/alice")
    assert site_for("hpc", "alice", "/keys/alice") is alice
    assert alice.config.user == "alice" and alice.config.identity_files == ("/keys/alice",)
    assert site_for("hpc", "bob", None) is not alice
