"""Sizes in bytes: the one parser and the one formatter of offload and its adapters.

A size is a number (``4``, ``1.5``, ``2e9``), optional spaces, then an optional prefix ``K``, ``M``, ``G``, ``T``
or ``P`` (any case), an optional ``i`` and an optional ``B``: ``4G``, ``500 MB``, ``1.5GiB``, ``2tb``. What a
prefix means is the caller's rule, because the peers it reads from disagree:

* **binary** (the default): every prefix is a power of 1024, with or without ``i``. SLURM (``--mem=4G``, sacct's
  ``211549K``), Grid Engine (qhost's ``23.5G``) and offload's own options (``memory = "4G"``) have always meant
  4 GiB by ``4G`` and ``4GB``, and users write it so.
* **decimal** (``binary=False``): a prefix with ``i`` is a power of 1024 (``Ki``, ``MiB``), without it a power
  of 1000 (``k``, ``MB``): the IEC/SI rule of Kubernetes' quantities and of Dask (``memory="8GB"`` is 8e9 bytes
  in dask-jobqueue, which the Dask adapter matches).

A number without a prefix counts ``unit`` bytes (1 unless the caller says otherwise: offload's memory counts
megabytes). The value is exact (no float rounding) and a fraction of a byte counts as a whole one: a size asked
for never shrinks. A caller words its own errors: this module raises :class:`ValueError`.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_SIZE = re.compile(r"(?P<n>(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*(?:(?P<prefix>[kmgtp])(?P<i>i)?)?b?", re.IGNORECASE)
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def parse_size(value: str | int, *, binary: bool = True, unit: int = 1) -> int:
    """The bytes in ``value`` (see the module's rule); a :class:`ValueError` for anything that is not a size."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        return value * unit
    match = _SIZE.fullmatch(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a size (e.g. 500M, 4G, 1.5TiB)")
    prefix = (match["prefix"] or "").lower()
    if not prefix:
        scale = unit
    elif binary or match["i"]:
        scale = 1024 ** _POWERS[prefix]
    else:
        scale = 1000 ** _POWERS[prefix]
    return math.ceil(Fraction(match["n"]) * scale)


def format_size(size: float) -> str:
    """``size`` bytes for people: ``512 B``, ``1.5 KiB``, ``20.0 MiB``, ``3.2 GiB`` (powers of 1024, one decimal)."""
    for name in _UNITS:
        if abs(size) < 1024 or name == _UNITS[-1]:
            return f"{size:.0f} {name}" if name == "B" else f"{size:.1f} {name}"
        size /= 1024
    raise AssertionError("unreachable")
