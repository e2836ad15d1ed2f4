"""Shared helpers of the benchmarks: medians of alternating runs, and Markdown tables of ratios."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

TESTSITE = os.environ.get("OFFLOAD_TESTSITE_DIR", "/var/lib/offload-testsite")


@dataclass
class Comparison:
    """One row: the same measurement for offload and a peer, repeated alternately."""

    what: str
    peer: str
    offload: list[float] = field(default_factory=list)
    other: list[float] = field(default_factory=list)
    unit: str = "s"
    lower_is_better: bool = True
    target: str = ""

    @property
    def ratio(self) -> float:
        """offload / peer (time: below 1 is better for offload; rates: above 1 is better)."""
        return statistics.median(self.offload) / statistics.median(self.other)

    def row(self) -> str:
        o, p = statistics.median(self.offload), statistics.median(self.other)
        return (f"| {self.what} | {o:.3g} {self.unit} | {self.peer}: {p:.3g} {self.unit} | **{self.ratio:.2f}** "
                f"| {self.target} |")  # fmt: skip


def alternate(runs: int, first: Callable[[], float], second: Callable[[], float]) -> tuple[list[float], list[float]]:
    """Run the two measurements alternately, starting with a different one each round (noise hits both)."""
    a: list[float] = []
    b: list[float] = []
    for i in range(runs):
        if i % 2 == 0:
            a.append(first())
            b.append(second())
        else:
            b.append(second())
            a.append(first())
    return a, b


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def table(rows: list[Comparison]) -> str:
    head = "| measurement | offload (median) | peer (median) | ratio offload/peer | target |\n|---|---|---|---|---|"
    return "\n".join([head, *(r.row() for r in rows)])


def machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}"


def squeue_empty(user: str | None = None) -> None:
    """Wait until the test site's queue has nothing left, so one measurement does not slow the next."""
    import subprocess

    argv = ["squeue", "--noheader", "--format=%i"] + ([f"--user={user}"] if user else [])
    for _ in range(600):
        if not subprocess.run(argv, capture_output=True, text=True).stdout.strip():
            return
        time.sleep(0.1)
