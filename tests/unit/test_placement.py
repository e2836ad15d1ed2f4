"""Placing a job on one of several sites (offload.placement), with each site stubbed at its seam: its profile's
checks, its one nodes() call and its submission. The real thing runs on the test site's SLURM cluster and Grid
Engine cell in tests/integration/test_placement.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from offload import ConfigError, JobSpec, NodeResources, Resources, SiteGroup, SubmissionError, load_profiles
from offload.config import SiteConfig


def node(name, gpus, used, cpus=16, cpus_used=0, state="idle", partitions=("gpu",)):
    return NodeResources(name=name, partitions=partitions, state=state, gpus=gpus, gpus_used=used, cpus=cpus,
                         cpus_used=cpus_used, memory_mb=64000, memory_used_mb=0)  # fmt: skip


class FakeSite:
    def __init__(self, name, nodes, refuse=None, invalid=None, down=False):
        self.name = name
        self.config = SiteConfig(name=name, host="h", partition="cpu", gpu_partition="gpu")
        self._nodes, self._refuse, self._invalid, self._down = nodes, refuse, invalid, down
        self.submitted: list[JobSpec] = []

    def validate(self, spec):
        if self._invalid:
            raise ConfigError(self._invalid)

    async def anodes(self):
        if self._down:
            from offload import SiteNotAnswering

            raise SiteNotAnswering("the site is not answering")
        return self._nodes

    async def asubmit(self, spec):
        if self._refuse:
            raise SubmissionError(f"refused: {self._refuse}", scheduler_message=self._refuse)
        self.submitted.append(spec)
        return SimpleNamespace(id="7", where=self.name)


GPU2 = JobSpec(["train"], resources=Resources(gpus=2))


async def test_the_site_where_it_starts_now_comes_first_whatever_the_order():
    busy = FakeSite("busy", [node("b1", 4, 4), node("b2", 4, 3)])
    free = FakeSite("free", [node("f1", 2, 0)])
    verdicts = await SiteGroup([busy, free]).arank(GPU2)
    assert [(v.site, v.feasible, v.starts_now) for v in verdicts] == [("free", True, True), ("busy", True, False)]
    assert (await SiteGroup([busy, free]).asubmit(GPU2)).where == "free"
    assert busy.submitted == []  # one site, one submission: nothing to cancel elsewhere


async def test_infeasible_and_unavailable_sites_are_skipped_with_their_reasons():
    small = FakeSite("small", [node("s1", 1, 0), node("s2", 1, 0)])  # 2 GPUs, but never on one node
    strict = FakeSite("strict", [node("x1", 8, 0)], invalid="walltime 48:00:00 is over the partition's limit")
    gone = FakeSite("gone", [], down=True)
    ok = FakeSite("ok", [node("o1", 4, 4)])  # capable, busy: it waits there, but it is the only one that can
    verdicts = {v.site: v for v in await SiteGroup([small, strict, gone, ok]).arank(GPU2)}
    assert "2 GPUs each" in verdicts["small"].reason and "largest has 1" in verdicts["small"].reason
    assert "over the partition's limit" in verdicts["strict"].reason
    assert verdicts["gone"].reason.startswith("unavailable") and not verdicts["gone"].feasible
    assert verdicts["ok"].feasible and not verdicts["ok"].starts_now
    assert (await SiteGroup([small, strict, gone, ok]).asubmit(GPU2)).where == "ok"


async def test_a_partition_the_site_lacks_and_nodes_that_take_no_jobs():
    site = FakeSite("a", [node("a1", 4, 0, state="drain"), node("a2", 4, 0, state="down*")])
    verdict = (await SiteGroup([site]).arank(GPU2))[0]
    assert not verdict.feasible and "take jobs" in verdict.reason
    named = JobSpec(["x"], resources=Resources(gpus=1, partition="booster"))
    verdict = (await SiteGroup([FakeSite("b", [node("b1", 4, 0)])]).arank(named))[0]
    assert not verdict.feasible and "no partition 'booster'" in verdict.reason


async def test_a_refusal_fails_over_to_the_next_site_and_all_refusals_are_said():
    first = FakeSite("first", [node("f1", 8, 0)], refuse="QOSMaxGRESPerUser")
    second = FakeSite("second", [node("s1", 2, 0)])
    assert (await SiteGroup([first, second]).asubmit(GPU2)).where == "second"
    both = SiteGroup([first, FakeSite("third", [node("t1", 2, 0)], refuse="Invalid account")])
    with pytest.raises(SubmissionError, match="(?s)first: refused: QOSMaxGRESPerUser.*third: refused: Invalid acc"):
        await both.asubmit(GPU2)


async def test_nowhere_feasible_is_a_clear_error_before_anything_is_submitted():
    small = FakeSite("small", [node("s1", 1, 0)])
    with pytest.raises(ConfigError, match="no site of small can run this job"):
        await SiteGroup([small]).asubmit(GPU2)
    assert small.submitted == []


def test_groups_and_lists_of_sites_in_the_profile_file(tmp_path):
    path = tmp_path / "sites.toml"
    path.write_text('[sites.a]\nhost = "a"\n[sites.b]\nhost = "b"\n[groups]\ngpu = ["b", "a"]\n')
    profiles = load_profiles(path)
    assert profiles.names("@gpu") == ["b", "a"]
    assert profiles.names("a, b") == ["a", "b"] and profiles.names(["@gpu", "a"]) == ["b", "a"]
    with pytest.raises(ConfigError, match="unknown group '@gpus'.*did you mean '@?gpu'"):
        profiles.names("@gpus")
    with pytest.raises(ConfigError, match="unknown site 'c'"):
        profiles.names("a,c")
    path.write_text('[sites.a]\nhost = "a"\n[groups]\ngpu = ["a", "leonardo"]\n')
    with pytest.raises(ConfigError, match=r"\[groups\] gpu names no site 'leonardo'"):
        load_profiles(path)


async def test_choose_gives_the_site_submit_would_use_or_every_reason():
    busy = FakeSite("busy", [node("b1", 4, 4)])
    free = FakeSite("free", [node("f1", 2, 0)])
    assert (await SiteGroup([busy, free]).achoose(GPU2)) is free
    with pytest.raises(ConfigError, match="(?s)no site of small can run.*small: needs 1 node"):
        await SiteGroup([FakeSite("small", [node("s1", 1, 0)])]).achoose(GPU2)


async def test_each_site_may_be_judged_with_the_job_as_built_for_it():
    """A Dask cluster's worker asks for cores only where the scheduler reserves them: the spec is a function of
    the site, and each site is judged with its own (with the first site's spec for both, neither could run it)."""
    strict = FakeSite("strict", [node("s1", 2, 0, cpus=2)])
    loose = FakeSite("loose", [node("l1", 2, 0, cpus=1)])
    seen = []

    def spec_for(site):
        seen.append(site.name)
        return JobSpec(["w"], resources=Resources(gpus=1, cpus=4 if site is strict else None))

    verdicts = await SiteGroup([strict, loose]).arank(spec_for)
    assert seen == ["strict", "loose"]
    assert [(v.site, v.feasible) for v in verdicts] == [("loose", True), ("strict", False)]
    assert (await SiteGroup([strict, loose]).achoose(spec_for)) is loose
