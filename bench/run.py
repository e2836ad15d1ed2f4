"""Run every benchmark against the test site (or the site of $OFFLOAD_CONFIG) and write the Markdown table.

    python bench/run.py [--runs 3] [--out docs/benchmarks.md] [--only scale-up,forwards]

Each row compares offload with a peer in the same run, alternating, medians over the runs. Ratios are
offload/peer: for times below 1 is better for offload, for rates above 1 is. With ``--only``, only those parts
run: their rows replace the same parts' rows of the table already in ``--out``, the other rows stay as they were
measured, and the report says which rows come from which run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import scaleup
import submit
import transfer
from common import machine, table

# part -> (how it is measured, the beginnings of its rows' first cell: how its rows are found in an older table)
PARTS = {
    "scale-up": (lambda runs: scaleup.measure(runs=runs), ("time to ",)),
    "submission": (lambda runs: submit.rate_rows(runs), ("submit 200 distinct jobs |", "submit 200 identical")),
    "WAN": (lambda runs: submit.wan_rows(runs), ("submit 200 distinct jobs over",)),
    "polling": (lambda runs: submit.polling_rows(), ("scheduler calls/min",)),
    "forwards": (lambda runs: transfer.forward_rows(runs), ("forward throughput", "1 KiB request/response")),
    "files": (lambda runs: transfer.file_rows(runs), ("put a ", "get a ", "1000 small files")),
}
HEAD = [
    "# Benchmarks",
    "",
    "offload side by side with a peer, in one process, on the same test site, alternating, medians over",
    "the runs. Ratios are offload/peer: for times below 1 favours offload, for rates (jobs/s) above 1 does.",
    "Rerun: `tox -e bench` (or `python bench/run.py --runs 3 --out docs/benchmarks.md` with the test site",
    "up; `--only scale-up,forwards` reruns some parts and keeps the other rows); each file in `bench/` says what",
    "it measures and how the peer is set up.",
    "",
]


def part_of(row: str) -> str | None:
    cell = row.removeprefix("| ")
    for name, (_, prefixes) in PARTS.items():
        if any(cell.startswith(prefix.removesuffix(" |")) and (not prefix.endswith(" |") or cell.startswith(prefix))
               for prefix in prefixes):  # fmt: skip
            return name
    return None


def merge(old: str, parts: list[str], new_rows: list[str]) -> list[str]:
    """The rows of ``old``'s table with those of ``parts`` replaced by ``new_rows``, in the order of PARTS."""
    kept: dict[str, list[str]] = {name: [] for name in PARTS}
    for line in old.splitlines():
        if line.startswith("| ") and not line.startswith("| measurement ") and (part := part_of(line)) is not None:
            kept[part].append(line)
    fresh: dict[str, list[str]] = {name: [] for name in PARTS}
    for row in new_rows:
        fresh[part_of(row) or parts[-1]].append(row)
    return [row for name in PARTS for row in (fresh[name] if name in parts else kept[name])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the Markdown report here")
    parser.add_argument("--only", default=None, help=f"comma-separated parts to run, of: {', '.join(PARTS)}")
    args = parser.parse_args()
    parts = list(PARTS) if args.only is None else [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    started = time.time()
    rows = []
    for name in parts:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        rows += PARTS[name][0](args.runs)
    when = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} on {machine()}"
    took = f"{args.runs} alternating runs per row, in {time.time() - started:.0f} s"
    lines = table(rows).splitlines()
    measured = [f"Measured {when},", f"{took}."]
    after: list[str] = []  # what follows the table in the file (written by hand: the profile) stays
    if args.out and Path(args.out).exists():
        old = Path(args.out).read_text().splitlines()
        start = next((i for i, line in enumerate(old) if line.startswith("| measurement ")), None)
        if start is not None:
            end = next((i for i in range(start, len(old)) if not old[i].startswith("|")), len(old))
            after = old[end:]
            if args.only is not None:
                lines = lines[:2] + merge("\n".join(old[start:end]), parts, lines[2:])
                first = next((i for i in range(start) if old[i].startswith(("Measured ", "Rows of "))), start)
                measured = [f"Rows of {', '.join(parts)}: measured {when},", f"{took}.", "The other rows, as measured "
                            "before:", *(line for line in old[first:start] if line.strip())]  # fmt: skip
    report = "\n".join([*HEAD, *measured, "", *lines, *(after or [""])])
    print(report)
    if args.out:
        Path(args.out).write_text(report if report.endswith("\n") else report + "\n")


if __name__ == "__main__":
    main()
