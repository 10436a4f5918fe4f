"""Patients as sequences of Norse Feedback reports: the scenario model and its data files.

A :class:`Scenario` is one patient's story: who they are (name, birth date, a synthetic national
identity number) and the feedback reports they answered (:class:`Report`: per tracked scale the item
answers, the alliance, the therapy preferences), with the day each report was answered. The data is in
``case-studies.yaml`` (Sonja and Harald from the case study, ``../shared/domain/README.md``) and
``clinic.yaml`` (the demo clinic's synthetic patients); each file's header documents its format.

:func:`answers_for` turns a report into the answers a patient gives on the static NF 2.1 form
(linkId -> answer code): every trigger, the items of the scales the triggers open, the alliance and the
preferences. The demo clinic (:mod:`fhir_norse.rom.demo.clinic`) posts them as QuestionnaireResponses;
``tests/rom/test_case_studies.py`` posts the case study's and checks the scoring against its own oracle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from fhir_norse.instruments.schema import InstrumentMapping

__all__ = [
    "ALLIANCE_ITEMS",
    "PREFERENCE_ANSWERS",
    "PREFERENCE_ITEMS",
    "Report",
    "Scenario",
    "answers_for",
    "case_studies",
    "case_study",
    "load_scenarios",
]

# The order of Report.alliance (the mapping's alliance items).
ALLIANCE_ITEMS = ("alliance-goal", "alliance-bond-1", "alliance-bond-2", "alliance-task")
PREFERENCE_ITEMS = (
    "pref-techniques",
    "pref-style",
    "pref-feelings",
    "pref-feelings-thoughts",
    "pref-relationship",
)
PREFERENCE_ANSWERS = frozenset({"less", "as-now", "more", "not-relevant", "prefer-not"})
# Where a scale not tracked in a report sits: level 2 of 1-7, below every opening threshold (closed).
UNTRACKED_LEVEL = 2
_LOWEST, _HIGHEST = 1, 7
# The weights of the two control digits of a Norwegian national identity number (mod 11).
_CONTROL_WEIGHTS = ((3, 7, 6, 1, 8, 9, 4, 5, 2), (5, 4, 3, 2, 7, 6, 5, 4, 3, 2))
# Synthetic numbers add 80 to the month (Skatteetaten's test numbers, "Tenor"): no real person has one.
_SYNTHETIC_MONTH = 80
HERE = Path(__file__).resolve().parent
# The safe loader, in C when PyYAML was built with libyaml.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Report:
    """One feedback report: per tracked scale the item answers in the problem direction (mapping item
    order, trigger first; a 1-tuple is the trigger alone, which must leave the scale closed), the four
    alliance answers (goal, bond-1, bond-2, task), the therapy preferences answered and any other single
    answers by linkId (the single and medication items)."""

    number: int
    scales: Mapping[str, tuple[int, ...]]
    alliance: tuple[int, int, int, int]
    preferences: Mapping[str, str] = field(default_factory=dict)
    answers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    """One patient's story (module doc): ``reports`` as listed in the data, ``total`` reports in all,
    ``days[k - 1]`` the day report ``k`` was answered (counted from the first), the last one
    ``ends_days_ago`` days before the story is loaded."""

    key: str
    given: str
    family: str
    gender: str
    birth_date: date
    national_id: str
    total: int
    days: tuple[int, ...]
    ends_days_ago: int
    reports: tuple[Report, ...]
    email: str | None = None

    @property
    def name(self) -> str:
        return f"{self.given} {self.family}"

    def complete(self) -> list[Report]:
        """Reports 1..``total``: the listed ones, and between them the previous listed report's scale
        and alliance answers carried forward under the new number (the story names no change there),
        without its preferences and single answers (the patient did not give them again)."""
        listed = {report.number: report for report in self.reports}
        out: list[Report] = []
        for number in range(1, self.total + 1):
            report = listed.get(number)
            if report is None:
                before = out[-1]
                report = Report(number=number, scales=before.scales, alliance=before.alliance)
            out.append(report)
        return out


def answers_for(report: Report, mapping: InstrumentMapping) -> dict[str, str]:
    """The linkId -> answer code set of ``report`` on the static form of ``mapping``: untracked scales
    sit at level 2 (closed); ValueError when the report contradicts the mapping's opening rule (a
    trigger alone that opens its scale, or all items of a scale its trigger leaves closed)."""
    levels = {code: values[0] for code, values in report.scales.items()}
    answers = _level_answers(mapping, levels)
    answers.update(zip(ALLIANCE_ITEMS, map(str, report.alliance), strict=True))
    answers.update(report.preferences)
    for code, values in report.scales.items():
        scale = mapping.scale(code)
        opens = values[0] > scale.open_if_trigger_gt
        if len(values) == 1:
            if opens:
                raise ValueError(f"report {report.number}: {code} opens, give all its items")
            continue
        if not opens:
            raise ValueError(f"report {report.number}: {code} stays closed, give its trigger only")
        if len(values) != len(scale.items):
            raise ValueError(f"report {report.number}: {code} needs {len(scale.items)} answers")
        for link_id, value in zip(scale.items, values, strict=True):
            answers[link_id] = _answered(value, reverse=link_id in scale.reverse_keyed)
    answers.update(report.answers)
    return answers


def _level_answers(mapping: InstrumentMapping, levels: Mapping[str, int]) -> dict[str, str]:
    """Every trigger answered at its scale's level (default :data:`UNTRACKED_LEVEL`), and every item of
    the scales those triggers open (scored in the problem direction, as the static form's enableWhen
    asks them); reverse-keyed items answered ``8 - level``."""
    answers: dict[str, str] = {}
    for scale in mapping.scales:
        if scale.trigger is None:
            continue
        level = levels.get(scale.code, UNTRACKED_LEVEL)
        answers[scale.trigger] = _answered(level, reverse=scale.trigger in scale.reverse_keyed)
    for scale in mapping.scales:
        trigger = mapping.trigger_of(scale)
        # A scale without a trigger of its own (subRecov) opens on another scale's trigger.
        owner = scale if scale.trigger is not None else mapping.scale_of_item(trigger)
        raw = int(answers[trigger])
        problem = _LOWEST + _HIGHEST - raw if trigger in owner.reverse_keyed else raw
        if problem <= scale.open_if_trigger_gt:
            continue
        level = levels.get(scale.code, UNTRACKED_LEVEL)
        for link_id in scale.items:
            if link_id != scale.trigger:
                answers[link_id] = _answered(level, reverse=link_id in scale.reverse_keyed)
    return answers


def _answered(value: int, *, reverse: bool) -> str:
    """The answer code of ``value`` in the problem direction (a reverse-keyed item answered 8 - value)."""
    return str(_LOWEST + _HIGHEST - value if reverse else value)


# ---------------------------------------------------------------------------------------------- the files


@cache
def load_scenarios(name: str) -> tuple[Scenario, ...]:
    """The patients of the data file ``name`` beside this module (``case-studies.yaml``,
    ``clinic.yaml``), checked (ValueError naming the patient and the problem)."""
    data = data_file(name)
    patients = data.get("patients")
    if not isinstance(patients, Mapping) or not patients:
        raise ValueError(f"{name}: no patients")
    return tuple(_scenario(str(key), body, name) for key, body in patients.items())


@cache
def data_file(name: str) -> dict[str, Any]:
    """The parsed YAML data file ``name`` beside this module."""
    text = (HERE / name).read_text(encoding="utf-8")
    data = yaml.load(text, Loader=_YAML_LOADER)
    if not isinstance(data, dict):
        raise ValueError(f"{name}: not a mapping")
    return data


def case_studies() -> tuple[Scenario, ...]:
    """Sonja and Harald (``case-studies.yaml``)."""
    return load_scenarios("case-studies.yaml")


def case_study(key: str) -> Scenario:
    """One case-study patient by key: ``sonja`` or ``harald``."""
    for scenario in case_studies():
        if scenario.key == key:
            return scenario
    raise KeyError(key)


def _scenario(key: str, body: Any, source: str) -> Scenario:
    where = f"{source}: {key}"
    if not isinstance(body, Mapping):
        raise ValueError(f"{where}: not a mapping")
    try:
        reports = tuple(_report(r) for r in body["reports"])
        scenario = Scenario(
            key=key,
            given=str(body["given"]),
            family=str(body["family"]),
            gender=str(body["gender"]),
            birth_date=_date(body["birth_date"]),
            national_id=str(body["national_id"]),
            total=int(body["total"]),
            days=tuple(int(d) for d in body["days"]),
            ends_days_ago=int(body["ends_days_ago"]),
            reports=reports,
            email=str(body["email"]) if body.get("email") else None,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None
    problems = _problems(scenario)
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)}")
    return scenario


def _date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def _report(body: Mapping[str, Any]) -> Report:
    alliance = tuple(int(v) for v in body["alliance"])
    if len(alliance) != len(ALLIANCE_ITEMS):
        raise ValueError(f"report {body.get('number')}: the alliance needs {len(ALLIANCE_ITEMS)} answers")
    return Report(
        number=int(body["number"]),
        scales={str(code): tuple(int(v) for v in values) for code, values in body["scales"].items()},
        alliance=(alliance[0], alliance[1], alliance[2], alliance[3]),
        preferences={str(k): str(v) for k, v in (body.get("preferences") or {}).items()},
        answers={str(k): str(v) for k, v in (body.get("answers") or {}).items()},
    )


def _problems(scenario: Scenario) -> list[str]:
    out: list[str] = []
    numbers = [r.number for r in scenario.reports]
    if not numbers or numbers != sorted(set(numbers)) or numbers[0] != 1 or numbers[-1] > scenario.total:
        out.append(f"reports must be numbered increasingly from 1 to at most {scenario.total}: {numbers}")
    if len(scenario.days) != scenario.total or list(scenario.days) != sorted(set(scenario.days)):
        out.append(f"days: {scenario.total} increasing days, one per report")
    if scenario.ends_days_ago < 1:
        out.append("ends_days_ago: at least 1 (no answer from the future)")
    if scenario.gender not in ("female", "male", "other", "unknown"):
        out.append(f"gender {scenario.gender!r} is no R4 administrative gender")
    if not is_synthetic_national_id(scenario.national_id, scenario.birth_date):
        out.append("national_id is no synthetic national identity number of that birth date")
    for report in scenario.reports:
        out += [f"report {report.number}: {p}" for p in _report_problems(report)]
    return out


def _report_problems(report: Report) -> Iterable[str]:
    values = [*report.alliance, *(v for answers in report.scales.values() for v in answers)]
    if any(not _LOWEST <= v <= _HIGHEST for v in values):
        yield f"answers are {_LOWEST}-{_HIGHEST}"
    if any(not answers for answers in report.scales.values()):
        yield "a tracked scale needs at least its trigger"
    for link_id, value in report.preferences.items():
        if link_id not in PREFERENCE_ITEMS or value not in PREFERENCE_ANSWERS:
            yield f"preference {link_id}: {value} is not one of {sorted(PREFERENCE_ANSWERS)}"


def is_synthetic_national_id(value: str, birth_date: date) -> bool:
    """Whether ``value`` is a synthetic Norwegian national identity number (fødselsnummer with the month
    plus 80) of ``birth_date``, with valid control digits."""
    if len(value) != 11 or not value.isdigit():
        return False
    born = f"{birth_date.day:02d}{birth_date.month + _SYNTHETIC_MONTH:02d}{birth_date.year % 100:02d}"
    if not value.startswith(born):
        return False
    digits = [int(c) for c in value]
    return all(_control(digits[: len(w)], w) == digits[len(w)] for w in _CONTROL_WEIGHTS)


def _control(digits: Sequence[int], weights: Sequence[int]) -> int:
    rest = 11 - sum(d * w for d, w in zip(digits, weights, strict=True)) % 11
    return 0 if rest == 11 else rest  # 10 never matches a digit: such a number is invalid
