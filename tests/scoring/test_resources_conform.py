"""What scoring writes conforms to the profiles it claims (``meta.profile``), with no error issue.

Administrations are built with :func:`fhir_norse.scoring.resources.build_administration` from the
real mappings in ``mappings/`` and validated with the content pack's
:class:`~fhir_norse.server.profiles.ProfileValidator` (https://hl7.org/fhir/R4/profiling.html) after
the structural R4 check. Warnings are allowed only for extensible bindings the profiles mean to be
open (a LOINC total or an item code where no NF 2.1 scale code applies).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from fhir_norse.instruments.schema import (
    InstrumentMapping,
    SumScoreMapping,
    load_mapping,
    load_sum_score_mapping,
)
from fhir_norse.outcomes import Issue
from fhir_norse.scoring import Nf21Scores, SumScore, score_nf21, score_sum
from fhir_norse.scoring.change import ScaleChange, scale_change, scale_change_for
from fhir_norse.scoring.resources import AdministrationResources, build_administration
from fhir_norse.server.profiles import ProfileValidator
from fhir_norse.server.validation import validate_resource

ROOT = Path(__file__).resolve().parents[2]
SD = "http://fhir-norse.org/fhir/StructureDefinition/"
RESPONSE = "QuestionnaireResponse/qr-1/_history/3"
PATIENT = "Patient/p-1"
AUTHORED = "2026-03-04T10:15:00+01:00"


@cache
def validator() -> ProfileValidator:
    return ProfileValidator.from_content_dir(ROOT)


@cache
def nf21() -> InstrumentMapping:
    return load_mapping(ROOT / "mappings" / "nf21-2.1.0.yaml")


@cache
def sum_mappings() -> dict[str, SumScoreMapping]:
    return {
        name: load_sum_score_mapping(ROOT / "mappings" / f"{name}-1.0.0.yaml") for name in ("phq9", "gad7")
    }


def ids() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"00000000-0000-4000-8000-{next(counter):012d}"


def nf21_scores(value: str, preference: str = "less") -> Nf21Scores:
    m = nf21()
    answers = {link_id: value for link_id in m.all_link_ids()}
    for p in m.preferences:
        answers[p.link_id] = preference
    return score_nf21(answers, m)


def mixed_scores() -> Nf21Scores:
    """Every answer kind: values, "not relevant", "prefer not to answer" and unanswered items."""
    m = nf21()
    kinds = ["1", "7", "not-relevant", "prefer-not", None, "4"]
    answers: dict[str, str] = {}
    for link_id, kind in zip(m.all_link_ids(), itertools.cycle(kinds), strict=False):
        if kind is not None:
            answers[link_id] = kind
    for p, value in zip(
        m.preferences, itertools.cycle(["less", "as-now", "more", "prefer-not"]), strict=False
    ):
        answers[p.link_id] = value
    return score_nf21(answers, m)


def sum_score(name: str, answer: str) -> SumScore:
    mapping = sum_mappings()[name]
    return score_sum({item: answer for item in mapping.total.items}, mapping)


def changes() -> dict[str, ScaleChange]:
    return {
        "sad": scale_change_for(nf21().scale("sad"), [2.0, 2.0, 7.0]),
        "worry": scale_change_for(nf21().scale("worry"), [6.0, 6.0, 6.0, 6.0]),
    }


def alliance_changes() -> dict[str, ScaleChange]:
    return {"total": scale_change("total", [6.5, 4.0], sd=1.0, r=0.8, cutoff=4.5, higher_is_worse=False)}


def build(**kw: Any) -> AdministrationResources:
    args: dict[str, Any] = {
        "response_ref": RESPONSE,
        "patient_ref": PATIENT,
        "authored": AUTHORED,
        "id_factory": ids(),
        "sum_mappings": sum_mappings(),
    }
    args.update(kw)
    return build_administration(**args)


ADMINISTRATIONS: dict[str, Callable[[], AdministrationResources]] = {
    "nf21 with change, alliance change and sums": lambda: build(
        scores=nf21_scores("7"),
        mapping=nf21(),
        changes=changes(),
        alliance_changes=alliance_changes(),
        sums=[sum_score("phq9", "LA6570-1"), sum_score("gad7", "LA6571-9")],
        issued="2026-03-04T10:16:02.123+01:00",
    ),
    "nf21 within range": lambda: build(scores=nf21_scores("2", "as-now"), mapping=nf21()),
    "nf21 mixed answers": lambda: build(scores=mixed_scores(), mapping=nf21(), changes=changes()),
    "nf21 without mapping": lambda: build(scores=nf21_scores("5", "more")),
    "phq9 alone": lambda: build(scores=None, sums=[sum_score("phq9", "LA6568-5")]),
    "gad7 alone": lambda: build(scores=None, sums=[sum_score("gad7", "LA6569-3")]),
}


def problems(resource: dict[str, Any]) -> list[Issue]:
    """Every issue of every claimed profile; the resource must claim exactly one, known to the pack."""
    claimed = resource["meta"]["profile"]
    assert len(claimed) == 1, claimed
    assert validator().knows(claimed[0]), claimed[0]
    return validator().validate(resource, claimed[0])


@pytest.mark.parametrize("name", sorted(ADMINISTRATIONS))
def test_every_resource_conforms_to_its_profile(name: str) -> None:
    built = ADMINISTRATIONS[name]()
    for resource in built.resources():
        validate_resource(resource)
        issues = problems(resource)
        assert [i.diagnostics for i in issues if i.severity != "warning"] == []
        # The only warnings: codes outside an extensible ValueSet, which the profiles allow.
        assert {(i.severity, i.code) for i in issues} <= {("warning", "code-invalid")}


def test_the_administrations_cover_every_profile_scoring_writes() -> None:
    claimed = {
        r["meta"]["profile"][0] for build_one in ADMINISTRATIONS.values() for r in build_one().resources()
    }
    expected = {
        SD + p for p in ("rom-scale-score", "rom-alliance", "rom-preference", "rom-panel", "rom-report")
    }
    assert claimed == expected


def test_a_broken_resource_is_caught() -> None:
    built = ADMINISTRATIONS["nf21 within range"]()
    panel = copy.deepcopy(built.panel)
    panel["hasMember"] = [{"reference": "Patient/p-1"}]
    report = copy.deepcopy(built.report)
    report["category"] = [{"text": "misc"}]
    score = copy.deepcopy(built.scale_scores[0])
    score["valueQuantity"]["code"] = "score"
    assert [i.expression for i in problems(panel) if i.severity == "error"] == [("Observation.hasMember[0]",)]
    assert [i.expression for i in problems(report) if i.severity == "error"] == [
        ("DiagnosticReport.category",)
    ]
    assert [i.expression for i in problems(score) if i.severity == "error"] == [
        ("Observation.valueQuantity.code",)
    ]
