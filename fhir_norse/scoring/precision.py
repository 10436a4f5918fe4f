"""Scores at the precision their instrument reports (``decimals`` of the mapping).

A score is rounded once, where it is computed, half up on its decimal digits (``5.665`` -> ``5.67``, as
a clinician rounds by hand; Python's ``round`` rounds half to even on the binary value, ``4.625`` ->
``4.62``). Everything that follows (z and T, reliable change and the trend, elevation, alerts, the
adaptive closing rule) uses that rounded score, which is also the one stored and read back as the history
of later administrations: so every statistic can be recomputed from the stored scores it compares, and a
score does not count differently at the administration that produced it and at the next one.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

__all__ = ["at_precision"]


def at_precision(value: float, decimals: int) -> float:
    """``value`` rounded half up to ``decimals`` places (an ``int`` for 0 places)."""
    # repr() is the shortest decimal that reads back as the same float: the digits a person sees.
    rounded = Decimal(repr(value)).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    return int(rounded) if decimals == 0 else float(rounded)
