"""A simulated patient for the adaptive rules: drives the pure functions of ``fhir_norse.adaptive`` the
way a server would, one administration after the other.

At administration k the driver

1. works out the state of every scale from the history so far (``scale_states``, with the clinician
   overrides in force at k),
2. reads this administration's trigger answers (problem direction),
3. asks ``scales_to_ask`` which scales to ask in full,
4. records what was measured: the trigger of every scale, and a full scale score only for the scales
   asked in full (the mean of the scale's answered items in the problem direction, as the real scoring
   does: a reverse-keyed item scores min + max - x, that is 8 - x),
5. appends that to the history.

A missed administration (``None``) appends an empty administration: nothing was measured.

The answers given for an administration may hold more items than were asked (a test can write "how the
patient feels" for every item); the driver only reads the triggers and the items of the scales it asked
in full, like a patient who only sees the questions shown to them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fhir_norse.adaptive import Measured, Override, ScaleState, scale_states, scales_to_ask
from fhir_norse.instruments.schema import InstrumentMapping

__all__ = [
    "Administration",
    "Answers",
    "answer_sheet",
    "asked_at",
    "pattern",
    "problem_score",
    "raw_answer",
    "simulate",
    "trigger_answers",
]

# One administration as the patient ticked it: linkId -> raw answer 1..7.
Answers = Mapping[str, int]


@dataclass(frozen=True)
class Administration:
    """What happened at one administration of the simulation."""

    index: int
    missed: bool
    asked: list[str]  # the scales asked in full, in the mapping's display order
    measured: dict[str, Measured]  # what was recorded per scale code (empty when missed)
    overrides: dict[str, Override]  # the clinician overrides in force at this administration
    states: dict[str, ScaleState]  # the state of every scale after this administration


def problem_score(mapping: InstrumentMapping, link_id: str, raw: int) -> float:
    """A raw answer in the problem direction (higher = more problems): reverse-keyed items are flipped."""
    scale = mapping.scale_of_item(link_id)
    handling = mapping.answer_handling
    if link_id in scale.reverse_keyed:
        return float(handling.min + handling.max - raw)
    return float(raw)


def raw_answer(mapping: InstrumentMapping, link_id: str, problem: int) -> int:
    """The raw answer a patient ticks to reach ``problem`` (problem direction) on this item."""
    scale = mapping.scale_of_item(link_id)
    handling = mapping.answer_handling
    if link_id in scale.reverse_keyed:
        return handling.min + handling.max - problem
    return problem


def trigger_answers(mapping: InstrumentMapping, answers: Answers) -> dict[str, float]:
    """This administration's trigger answers, by linkId, in the problem direction.

    A scale with ``opens_on`` (Substance Recovery) has no trigger of its own: ``trigger_of`` gives the
    trigger of the scale it opens on, and that item is read with its own scale's keying."""
    out: dict[str, float] = {}
    for scale in mapping.scales:
        link_id = mapping.trigger_of(scale)
        if link_id in answers:
            out[link_id] = problem_score(mapping, link_id, answers[link_id])
    return out


def _measure(
    mapping: InstrumentMapping, answers: Answers, triggers: Mapping[str, float], asked: Sequence[str]
) -> dict[str, Measured]:
    measured: dict[str, Measured] = {}
    for scale in mapping.scales:
        trigger = triggers.get(mapping.trigger_of(scale))
        full_score = None
        if scale.code in asked:
            # The scale's own items only: Substance Recovery does not average in the subUse trigger.
            values = [problem_score(mapping, i, answers[i]) for i in scale.items if i in answers]
            if values:
                full_score = sum(values) / len(values)
        measured[scale.code] = Measured(trigger, full_score)
    return measured


def simulate(
    mapping: InstrumentMapping,
    administrations: Sequence[Answers | None],
    overrides: Mapping[int, Mapping[str, Override]] | None = None,
) -> list[Administration]:
    """Run a patient through ``administrations`` (oldest first; ``None`` = missed).

    ``overrides`` maps an administration index to the overrides in force at that administration
    (scale code -> "open" or "closed"); an index that is not there has no override at all."""
    overrides = overrides or {}
    history: list[dict[str, Measured]] = []
    run: list[Administration] = []
    for k, answers in enumerate(administrations):
        in_force = dict(overrides.get(k, {}))
        if answers is None:
            history.append({})
            after = scale_states(mapping, history, in_force)
            run.append(Administration(k, True, [], {}, in_force, after))
            continue
        before = scale_states(mapping, history, in_force)
        triggers = trigger_answers(mapping, answers)
        asked = scales_to_ask(mapping, before, triggers)
        measured = _measure(mapping, answers, triggers, asked)
        history.append(measured)
        after = scale_states(mapping, history, in_force)
        run.append(Administration(k, False, asked, measured, in_force, after))
    return run


def answer_sheet(mapping: InstrumentMapping, **levels: tuple[int, int]) -> dict[str, int]:
    """Raw answers to every item of every scale for one administration.

    Every scale answers "no problem" (problem level 1, so raw 7 on a reverse-keyed item), except the
    scales named as keyword arguments: ``sad=(6, 5)`` means the trigger at problem level 6 and every
    other item of the scale at problem level 5. Levels are in the problem direction; the raw answers are
    flipped back on reverse-keyed items, and the driver flips them again when it scores."""
    for code in levels:
        mapping.scale(code)  # a misspelt scale code fails here, not silently
    sheet: dict[str, int] = {}
    for scale in mapping.scales:
        trigger_level, rest_level = levels.get(scale.code, (1, 1))
        for link_id in scale.items:
            level = trigger_level if link_id == scale.trigger else rest_level
            sheet[link_id] = raw_answer(mapping, link_id, level)
    return sheet


def pattern(run: Sequence[Administration], code: str) -> str:
    """One character per administration for scale ``code``:

    ``O`` asked in full, open afterwards; ``C`` asked in full, closed afterwards (it closed there, or an
    "open" override asked it while the rules keep it closed); ``.`` only the trigger asked, closed
    afterwards; ``t`` only the trigger asked though the rules have it open (a "closed" override);
    ``-`` a missed administration."""
    out = []
    for adm in run:
        if adm.missed:
            out.append("-")
            continue
        is_open = adm.states[code].open
        if code in adm.asked:
            out.append("O" if is_open else "C")
        else:
            out.append("t" if is_open else ".")
    return "".join(out)


def asked_at(run: Sequence[Administration], code: str) -> list[int]:
    """The indices of the administrations at which ``code`` was asked in full."""
    return [adm.index for adm in run if code in adm.asked]
