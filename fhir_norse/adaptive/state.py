"""Per-patient scale state of an adaptive instrument (pure: history and rules in, state out).

Groundwork for issue 6 (``$next-question`` and tailored forms build on it). Rules from
``../shared/domain/README.md`` and the mapping (no threshold in this module):

* Every administration asks every trigger first. A scale is **asked in full** at an administration when
  it was open before it, or when that administration's trigger (problem direction) is strictly above
  ``open_if_trigger_gt`` (a closed scale re-opens there, within the same administration; a scale with
  ``opens_on`` follows the other scale's trigger).
* After an administration, a scale whose trigger was above the threshold is **open**. Then the mapping's
  ``close_rule`` decides whether an open scale **closes**: it has at least ``close_min_administrations``
  full scale scores and the mean of its last ``close_window`` full scores is strictly below
  ``close_if_mean_last3_lt`` --

  - ``moving-average`` (the published rule, mapping 2.2.0): that is all; a high latest trigger does not
    keep a low-mean scale open (it closes, and its trigger, asked first next time, re-opens it there
    when it is still above the opening threshold);
  - ``moving-average-unless-trigger-open`` (the 2.1.0 behaviour): a scale whose trigger at this
    administration was above the opening threshold stays open whatever its mean.

  ``close_min_administrations`` is a named deviation from the published rules (they leave fewer scores
  open): with fewer full scores the scale stays open, so a scale is never closed on the strength of one
  or two administrations. Trigger-only scores (the scale was closed) do not count. "The last 3" are the
  last 3 full scores, also from before the scale last closed: a scale that re-opens may close again after
  one administration when its earlier scores were low (the literal moving average of the sources).
* An administration that did not measure a scale (missing, or not a scored administration) changes
  nothing for it.
* **Clinician overrides** win over the rules: ``open`` asks the scale in full every time, ``closed``
  asks only its trigger (the trigger is always asked, so a rising trigger stays visible). The rules keep
  running underneath, so lifting an override returns the scale to the state its history gives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from fhir_norse.instruments.schema import InstrumentMapping, Scale

__all__ = ["Measured", "Override", "ScaleState", "scale_states", "scales_to_ask"]

Override = Literal["open", "closed"]


@dataclass(frozen=True, slots=True)
class Measured:
    """One scale at one administration: the trigger in the problem direction and, when the scale was
    asked in full, its scale score (``None`` when only the trigger was asked)."""

    trigger: float | None
    full_score: float | None = None


@dataclass(frozen=True)
class ScaleState:
    """Where a scale stands before the next administration."""

    scale: str
    open: bool  # what the rules say
    full_scores: tuple[float, ...]  # the last ``close_window`` full scale scores, oldest first
    override: Override | None = None

    @property
    def asked_in_full(self) -> bool:
        """Asked in full at the next administration whatever its trigger (rules or override)."""
        return self.override == "open" or (self.open and self.override != "closed")

    @property
    def mean_last(self) -> float | None:
        return None if not self.full_scores else sum(self.full_scores) / len(self.full_scores)


def _opens(scale: Scale, trigger: float | None) -> bool:
    return trigger is not None and trigger > scale.open_if_trigger_gt


def _closes(mapping: InstrumentMapping, scale: Scale, scores: Sequence[float]) -> bool:
    if len(scores) < max(mapping.close_min_administrations, 1):
        return False
    window = scores[-scale.close_window :]
    return sum(window) / len(window) < scale.close_if_mean_last3_lt


def scale_states(
    mapping: InstrumentMapping,
    history: Sequence[Mapping[str, Measured]],
    overrides: Mapping[str, Override] | None = None,
) -> dict[str, ScaleState]:
    """The state of every scale after ``history`` (oldest first; each administration maps scale code
    -> what was measured; a scale missing from an administration was not measured there)."""
    overrides = overrides or {}
    out: dict[str, ScaleState] = {}
    for scale in mapping.scales:
        is_open = False
        scores: list[float] = []
        for administration in history:
            measured = administration.get(scale.code)
            if measured is None:
                continue
            if measured.full_score is not None:
                scores.append(measured.full_score)
            opened = _opens(scale, measured.trigger)
            is_open = is_open or opened
            kept_by_trigger = opened and mapping.close_rule == "moving-average-unless-trigger-open"
            if is_open and not kept_by_trigger and _closes(mapping, scale, scores):
                is_open = False
        window = tuple(scores[-scale.close_window :])
        out[scale.code] = ScaleState(scale.code, is_open, window, overrides.get(scale.code))
    return out


def scales_to_ask(
    mapping: InstrumentMapping, states: Mapping[str, ScaleState], triggers: Mapping[str, float | None]
) -> list[str]:
    """The scales to ask in full now, in the mapping's display order, given this administration's
    trigger answers (problem direction, by the trigger's linkId)."""
    out = []
    for code in mapping.display_order:
        scale = mapping.scale(code)
        state = states.get(code)
        if state is not None and state.override == "closed":
            continue
        if (state is not None and state.asked_in_full) or _opens(
            scale, triggers.get(mapping.trigger_of(scale))
        ):
            out.append(code)
    return out
