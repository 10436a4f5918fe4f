"""The profiles of adaptive administration (issue 6) in the content pack's validator.

* ``rom-scale-override`` (ServiceRequest): a clinician forces one NF 2.1 scale open
  (``doNotPerform`` false) or closed (true); who (``requester``), when (``authoredOn``) and why
  (``reasonCode``/``note``, invariant ``rom-override-1``) are required, exactly one scale coding, an
  optional ``workflow-episodeOfCare`` extension. The rules are those the write hook
  (:class:`fhir_norse.rom.adaptive.ScaleOverrideHook`) enforces, so what the server accepts conforms.
* ``administration-context`` may now sit on the Observations and the DiagnosticReport scoring derives,
  which carry it (and the episode) next to the response's: they still conform to their profiles.

https://hl7.org/fhir/R4/profiling.html, https://hl7.org/fhir/R4/servicerequest.html.
"""

from __future__ import annotations

import copy
import itertools
import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from fhir_norse.adaptive.history import CONTEXT_EXTENSION, EPISODE_EXTENSION
from fhir_norse.canonicals import CS_SCALES, PROFILE_OVERRIDE
from fhir_norse.instruments.schema import InstrumentMapping, load_mapping
from fhir_norse.outcomes import Issue
from fhir_norse.rom.patient import context_extension, episode_extension
from fhir_norse.scoring import score_nf21
from fhir_norse.scoring.resources import AdministrationResources, build_administration
from fhir_norse.server.profiles import ProfileValidator
from fhir_norse.server.validation import validate_resource

JsonDict = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
SD = "http://fhir-norse.org/fhir/StructureDefinition/"
CS = "http://fhir-norse.org/fhir/CodeSystem/"
OVERRIDE = SD + "rom-scale-override"
SCALES_VALUE_SET = "http://fhir-norse.org/fhir/ValueSet/nf21-scales"
VERSION = json.loads((ROOT / "profiles" / "package.json").read_text())["version"]
DERIVED_PROFILES = ("rom-scale-score", "rom-alliance", "rom-preference", "rom-panel", "rom-report")


@cache
def validator() -> ProfileValidator:
    return ProfileValidator.from_content_dir(ROOT)


@cache
def nf21() -> InstrumentMapping:
    return load_mapping(ROOT / "mappings" / "nf21-2.1.0.yaml")


def errors(issues: list[Issue]) -> list[Issue]:
    return [i for i in issues if i.severity == "error"]


def only_error(issues: list[Issue]) -> Issue:
    found = errors(issues)
    assert len(found) == 1, [i.diagnostics for i in issues]
    return found[0]


# --- rom-scale-override ---------------------------------------------------------------------------


def override(**changes: Any) -> JsonDict:
    """A conforming override: sad forced closed in one episode, by a named clinician, with a reason."""
    body: JsonDict = {
        "resourceType": "ServiceRequest",
        "id": "sr1",
        "meta": {"profile": [OVERRIDE]},
        "extension": [episode_extension("EpisodeOfCare/eoc1")],
        "status": "active",
        "intent": "order",
        "category": [{"coding": [{"system": CS + "rom-codes", "code": "scale-override"}]}],
        "doNotPerform": True,
        "code": {"coding": [{"system": CS_SCALES, "code": "sad", "display": "Sadness"}]},
        "subject": {"reference": "Patient/p1"},
        "authoredOn": "2026-03-04T10:15:00+01:00",
        "requester": {"reference": "Practitioner/dr-hansen"},
        "reasonCode": [{"text": "Sadness is treated by the GP; ask only the trigger"}],
    }
    body.update(changes)
    return body


def test_the_override_profile_is_in_the_pack() -> None:
    assert PROFILE_OVERRIDE == OVERRIDE
    v = validator()
    assert v.knows(OVERRIDE) and v.knows(f"{OVERRIDE}|{VERSION}")
    assert v.profile_type(OVERRIDE) == "ServiceRequest"


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"doNotPerform": False},
        {"extension": []},
        {"status": "revoked"},
        {"requester": {"reference": "PractitionerRole/pr1"}},
        {"reasonCode": [], "note": [{"text": "Patient asked for it"}]},
        {"reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "35489007"}]}]},
        {
            "category": [
                {"text": "other"},
                {
                    "coding": [
                        {"system": CS + "rom-codes", "code": "scale-override", "display": "Scale override"}
                    ]
                },
            ]
        },
        {"code": {"coding": [{"system": CS_SCALES, "code": "worry"}], "text": "Worry"}},
    ],
    ids=lambda v: ",".join(v) or "as-built",
)
def test_a_valid_override_conforms(variant: JsonDict) -> None:
    body = override(**variant)
    for key in [k for k, value in variant.items() if value == []]:
        del body[key]
    validate_resource(body, expected_type="ServiceRequest")
    assert validator().validate(body, OVERRIDE) == []


def _without(key: str) -> JsonDict:
    body = override()
    del body[key]
    return body


@pytest.mark.parametrize(
    ("body", "expression", "says"),
    [
        (_without("requester"), "ServiceRequest.requester", "at least 1 required, found 0"),
        (_without("authoredOn"), "ServiceRequest.authoredOn", "at least 1 required, found 0"),
        (_without("doNotPerform"), "ServiceRequest.doNotPerform", "at least 1 required, found 0"),
        (
            override(
                code={
                    "coding": [{"system": CS_SCALES, "code": "sad"}, {"system": CS_SCALES, "code": "worry"}]
                }
            ),
            "ServiceRequest.code.coding",
            "slice 'scale': at most 1 allowed, found 2",
        ),
        (_without("code"), "ServiceRequest.code", "at least 1 required, found 0"),
        (
            override(code={"coding": [{"system": CS_SCALES, "code": "weather"}]}),
            "ServiceRequest.code",
            f"is in ValueSet {SCALES_VALUE_SET} (required)",
        ),
        (_without("reasonCode"), "ServiceRequest", "rom-override-1"),
        (override(reasonCode=[{"id": "r"}]), "ServiceRequest", "rom-override-1"),
        (
            override(category=[{"coding": [{"system": CS + "rom-codes", "code": "rom"}]}]),
            "ServiceRequest.category",
            "slice 'scaleOverride': at least 1 required, found 0",
        ),
        (override(intent="plan"), "ServiceRequest.intent", 'is not the fixed value "order"'),
        (
            override(subject={"reference": "Group/g1"}),
            "ServiceRequest.subject",
            "refers to a Group, but only Patient is allowed",
        ),
        (
            override(requester={"reference": "Organization/o1"}),
            "ServiceRequest.requester",
            "only Practitioner or PractitionerRole is allowed",
        ),
        (
            override(extension=[episode_extension("EpisodeOfCare/a"), episode_extension("EpisodeOfCare/b")]),
            "ServiceRequest.extension",
            "slice 'episodeOfCare': at most 1 allowed, found 2",
        ),
    ],
    ids=[
        "no-requester",
        "no-authoredOn",
        "no-doNotPerform",
        "two-scales",
        "no-code",
        "unknown-scale",
        "no-reason",
        "empty-reason",
        "no-override-category",
        "intent-plan",
        "subject-group",
        "requester-organization",
        "two-episodes",
    ],
)
def test_a_broken_override_fails_with_a_clear_message(body: JsonDict, expression: str, says: str) -> None:
    issue = only_error(validator().validate(body, OVERRIDE))
    assert issue.expression == (expression,)
    assert says in issue.diagnostics
    # The message names the element definition and the profile it comes from.
    assert f"in {OVERRIDE}|{VERSION})" in issue.diagnostics


def test_a_code_from_another_system_is_not_a_scale() -> None:
    body = override(code={"coding": [{"system": "http://loinc.org", "code": "44261-6"}]})
    found = [(i.expression, i.diagnostics) for i in errors(validator().validate(body, OVERRIDE))]
    assert [e for e, _ in found] == [("ServiceRequest.code",), ("ServiceRequest.code.coding",)]
    assert "http://loinc.org#44261-6" in found[0][1]
    assert "slice 'scale': at least 1 required, found 0" in found[1][1]


def test_every_problem_is_reported_at_once() -> None:
    body = override()
    for key in ("requester", "authoredOn", "doNotPerform", "reasonCode"):
        del body[key]
    found = {i.expression[0] for i in errors(validator().validate(body, OVERRIDE))}
    assert found == {
        "ServiceRequest",
        "ServiceRequest.requester",
        "ServiceRequest.authoredOn",
        "ServiceRequest.doNotPerform",
    }


def test_every_scale_the_server_adapts_can_be_overridden() -> None:
    """The hook accepts the scales of the adaptive mappings; the profile's ValueSet holds them all."""
    expansion = validator().terminology.expand(SCALES_VALUE_SET)
    assert expansion is not None
    scales = {s.code for s in nf21().scales}
    assert scales and scales <= expansion[CS_SCALES]
    for code in sorted(scales):
        body = override(code={"coding": [{"system": CS_SCALES, "code": code}]})
        assert validator().validate(body, OVERRIDE) == [], code


def test_the_override_category_code_is_defined() -> None:
    rom_codes = json.loads((ROOT / "profiles" / "CodeSystem-rom-codes.json").read_text())
    concepts = {c["code"]: c for c in rom_codes["concept"]}
    assert concepts["scale-override"]["definition"]
    assert rom_codes["count"] == len(concepts)


# --- administration-context and the episode on derived resources ---------------------------------


def _administration() -> AdministrationResources:
    m = nf21()
    answers = {link_id: "6" for link_id in m.all_link_ids()}
    for p in m.preferences:
        answers[p.link_id] = "more"
    counter = itertools.count(1)
    return build_administration(
        response_ref="QuestionnaireResponse/qr-1/_history/1",
        patient_ref="Patient/p-1",
        authored="2026-03-04T10:15:00+01:00",
        scores=score_nf21(answers, m),
        mapping=m,
        id_factory=lambda: f"00000000-0000-4000-8000-{next(counter):012d}",
    )


def _stamped(resource: JsonDict, context: str = "weekly") -> JsonDict:
    """As intake stores it: the administration context and the episode appended to the extensions."""
    out = copy.deepcopy(resource)
    out["extension"] = [
        *out.get("extension", []),
        context_extension(context),
        episode_extension("EpisodeOfCare/eoc1"),
    ]
    return out


@pytest.mark.parametrize("context", ["intake", "weekly", "termination"])
def test_derived_resources_with_the_administration_extensions_conform(context: str) -> None:
    built = _administration()
    claimed: set[str] = set()
    for resource in built.resources():
        stamped = _stamped(resource, context)
        validate_resource(stamped)
        (profile,) = stamped["meta"]["profile"]
        claimed.add(profile)
        issues = validator().validate(stamped, profile)
        assert [i.diagnostics for i in issues if i.severity != "warning"] == []
        # The same warnings (if any) as without the extensions: they change nothing else.
        assert [i.diagnostics for i in issues] == [
            i.diagnostics for i in validator().validate(resource, profile)
        ]
    assert claimed == {SD + p for p in DERIVED_PROFILES}


def test_a_scale_score_with_the_context_conforms() -> None:
    score = _stamped(_administration().scale_scores[0])
    assert score["meta"]["profile"] == [SD + "rom-scale-score"]
    assert {e["url"] for e in score["extension"]} >= {CONTEXT_EXTENSION, EPISODE_EXTENSION}
    assert errors(validator().validate(score, SD + "rom-scale-score")) == []


def test_the_extension_is_allowed_where_scoring_puts_it() -> None:
    """Its context names every resource type that carries it: the response and what scoring derives."""
    sd = json.loads((ROOT / "profiles" / "StructureDefinition-administration-context.json").read_text())
    contexts = {c["expression"] for c in sd["context"] if c["type"] == "element"}
    carried = {r["resourceType"] for r in _administration().resources()} | {"QuestionnaireResponse"}
    assert carried == {"Observation", "DiagnosticReport", "QuestionnaireResponse"}
    assert carried <= contexts


def test_the_stamped_extension_conforms_to_its_definition() -> None:
    v = validator()
    for code in ("intake", "weekly", "termination"):
        assert v.validate(context_extension(code), CONTEXT_EXTENSION) == []
    wrong = context_extension("weekly")
    wrong["valueCoding"]["code"] = "monthly"
    issue = only_error(v.validate(wrong, CONTEXT_EXTENSION))
    assert issue.expression == ("Extension.valueCoding",)
