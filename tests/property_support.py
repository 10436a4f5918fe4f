"""Helpers for the Hypothesis property tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from hypothesis import strategies as st

__all__ = ["picks"]

T = TypeVar("T")


def picks(draw: st.DrawFn, options: Sequence[T], n: int) -> list[T]:
    """``n`` of ``options``, drawn as one byte string (byte value modulo the number of options).

    One choice for Hypothesis however large ``n`` is: a whole answer sheet is fast to generate (each
    choice costs tens of microseconds) and a patient of many administrations stays within Hypothesis's
    budget for one case. Shrinks towards ``options[0]``, byte by byte."""
    return [options[b % len(options)] for b in draw(st.binary(min_size=n, max_size=n))]
