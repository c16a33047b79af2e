"""Relative depth and its bands: one place for where "early", "middle" and "late" begin.

A residual point l of an L-block model sits at depth l / L and block i at (i + 0.5) / L. Claims
and figures split depth in thirds (the study's early / intermediate / late layers); selective
fine-tuning names bands of blocks by the same thirds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

THIRDS = (1 / 3, 2 / 3)
BANDS: dict[str, tuple[tuple[float, float], ...]] = {
    "full": ((0.0, 1.0),),
    "early": ((0.0, THIRDS[0]),),
    "middle": (THIRDS,),
    "late": ((THIRDS[1], 1.0),),
    "complement": ((0.0, THIRDS[0]), (THIRDS[1], 1.0)),
}  # selective fine-tuning's named bands of blocks


def band_bounds(band: str | Iterable[float], thirds: Iterable[float] = THIRDS):
    """(lo, hi) relative-depth bounds of ``band`` (early | middle | late | [lo, hi])."""
    a, b = (float(x) for x in thirds)
    if isinstance(band, str):
        named = {"early": (-math.inf, a), "middle": (a, b), "late": (b, math.inf)}
        if band not in named:
            raise ValueError(f"band {band!r} is not early, middle, late or [lo, hi]")
        return named[band]
    lo, hi = (float(x) for x in band)
    return lo, hi


def band_of(depth: float, thirds: Iterable[float] = THIRDS) -> str:
    """early (< thirds[0]), middle (thirds[0] <= depth <= thirds[1]) or late."""
    a, b = (float(x) for x in thirds)
    return "early" if depth < a else ("late" if depth > b else "middle")


def in_band(depth: float, band, thirds: Iterable[float] = THIRDS) -> bool:
    """Whether ``depth`` lies in ``band`` (a name of :func:`band_of`, or [lo, hi] inclusive)."""
    if isinstance(band, str):
        return band_of(depth, thirds) == band
    lo, hi = band_bounds(band, thirds)
    return lo <= depth <= hi


def parse_band(text: str) -> tuple[tuple[float, float], ...]:
    """A band name of :data:`BANDS` or ``LO:HI[,LO:HI...]`` in relative depth."""
    if text in BANDS:
        return BANDS[text]
    try:
        ranges = tuple(
            tuple(float(x) for x in part.split(":", 1)) for part in text.split(",") if part
        )
    except ValueError:
        ranges = ()
    if not ranges or any(len(r) != 2 or not 0 <= r[0] < r[1] <= 1 for r in ranges):
        raise ValueError(
            f"band {text!r}: expected one of {sorted(BANDS)} or LO:HI[,LO:HI] with "
            "0 <= LO < HI <= 1"
        )
    return ranges
