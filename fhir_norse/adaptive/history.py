"""A patient's administrations of an adaptive instrument, read back from its stored scale Observations.

Pure: Observation bodies (JSON) in, administrations out; the server reads the bodies
(``fhir_norse.rom.adaptive``). The scored history is the only state adaptive administration keeps: each
``rom-scale-score`` Observation carries its scale's score, the trigger in the problem direction
(component ``trigger-score``) and, when the scale was answered by its trigger alone, the interpretation
``trigger-only``; ``derivedFrom`` names the response, ``effectiveDateTime`` its ``authored``, and the
extensions ``workflow-episodeOfCare`` and ``administration-context`` the episode and the context.

Only ``final`` and ``amended`` Observations count (``entered-in-error`` ones were withdrawn with their
response), so a withdrawn administration changes nothing, exactly like a missed one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fhir_norse.adaptive.state import Measured
from fhir_norse.canonicals import (
    CONTEXT_EXTENSION,
    CS_ALLIANCE,
    CS_COMPONENTS,
    CS_CONTEXT,
    CS_INTERPRETATION,
    CS_SCALES,
)

__all__ = [
    "CONTEXT_EXTENSION",
    "CS_CONTEXT",
    "EPISODE_EXTENSION",
    "Administration",
    "Fact",
    "administrations",
    "context_of",
    "episode_of",
    "fact_of",
    "from_facts",
    "moment",
]

# R5's cross-version extension, usable on R4 Observation, DiagnosticReport, QuestionnaireResponse and
# ServiceRequest: https://hl7.org/fhir/extensions/StructureDefinition-workflow-episodeOfCare.html
EPISODE_EXTENSION = "http://hl7.org/fhir/StructureDefinition/workflow-episodeOfCare"
_COUNTED = frozenset({"final", "amended"})


@dataclass
class Administration:
    """One stored administration of the instrument (its scale and alliance scores)."""

    response: str  # the QuestionnaireResponse id
    authored: str
    episode: str | None = None  # "EpisodeOfCare/<id>"
    context: str | None = None  # intake | weekly | termination
    scales: dict[str, float] = field(default_factory=dict)  # scale code -> score
    alliance: dict[str, float] = field(default_factory=dict)  # dimension or total -> mean
    measured: dict[str, Measured] = field(default_factory=dict)  # scale code -> trigger and full score


def moment(value: str) -> datetime:
    """A FHIR date/dateTime as an aware instant (the start of a partial date), for ordering."""
    text = value.strip()
    if len(text) == 4:
        text += "-01-01"
    elif len(text) == 7:
        text += "-01"
    at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def episode_of(resource: Mapping[str, Any]) -> str | None:
    """The ``EpisodeOfCare/<id>`` a resource names in its ``workflow-episodeOfCare`` extension."""
    for ext in resource.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == EPISODE_EXTENSION:
            ref = (ext.get("valueReference") or {}).get("reference")
            if isinstance(ref, str) and ref.startswith("EpisodeOfCare/"):
                return ref.split("/_history/", 1)[0]
    return None


def context_of(resource: Mapping[str, Any]) -> str | None:
    """The administration context code (intake | weekly | termination) a resource carries."""
    for ext in resource.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == CONTEXT_EXTENSION:
            coding = ext.get("valueCoding") or {}
            if coding.get("system") == CS_CONTEXT and isinstance(coding.get("code"), str):
                return str(coding["code"])
    return None


def _component_value(obs: Mapping[str, Any], code: str) -> float | None:
    for comp in obs.get("component") or []:
        for coding in (comp.get("code") or {}).get("coding") or []:
            if coding.get("system") == CS_COMPONENTS and coding.get("code") == code:
                value = (comp.get("valueQuantity") or {}).get("value")
                return float(value) if isinstance(value, int | float) else None
    return None


def _trigger_only(obs: Mapping[str, Any]) -> bool:
    return any(
        coding.get("system") == CS_INTERPRETATION and coding.get("code") == "trigger-only"
        for concept in obs.get("interpretation") or []
        for coding in concept.get("coding") or []
    )


@dataclass(frozen=True, slots=True)
class Fact:
    """What one scale or alliance Observation says about its administration."""

    response: str
    authored: str
    episode: str | None
    context: str | None
    system: str
    code: str
    value: float
    measured: Measured | None  # scales only


def fact_of(obs: Mapping[str, Any], scales: frozenset[str]) -> Fact | None:
    """The fact a counted scale or alliance Observation states, else None."""
    if obs.get("status") not in _COUNTED:
        return None
    coding = ((obs.get("code") or {}).get("coding") or [{}])[0]
    system, code = coding.get("system"), coding.get("code")
    if system not in (CS_SCALES, CS_ALLIANCE) or not isinstance(code, str):
        return None
    if system == CS_SCALES and code not in scales:
        return None
    source = ((obs.get("derivedFrom") or [{}])[0]).get("reference")
    when = obs.get("effectiveDateTime")
    value = (obs.get("valueQuantity") or {}).get("value")
    if not isinstance(source, str) or not source.startswith("QuestionnaireResponse/"):
        return None
    if not isinstance(when, str) or not isinstance(value, int | float):
        return None
    measured = None
    if system == CS_SCALES:
        full = None if _trigger_only(obs) else float(value)
        measured = Measured(_component_value(obs, "trigger-score"), full)
    return Fact(
        source.split("/")[1], when, episode_of(obs), context_of(obs), system, code, float(value), measured
    )


def from_facts(facts: Iterable[Fact | None]) -> list[Administration]:
    """The administrations the facts describe, oldest first (by ``authored``, then response id)."""
    by_response: dict[str, Administration] = {}
    for fact in facts:
        if fact is None:
            continue
        adm = by_response.get(fact.response)
        if adm is None:
            adm = by_response[fact.response] = Administration(
                fact.response, fact.authored, fact.episode, fact.context
            )
        if fact.measured is None:
            adm.alliance[fact.code] = fact.value
        else:
            adm.scales[fact.code] = fact.value
            adm.measured[fact.code] = fact.measured
    return sorted(by_response.values(), key=lambda a: (moment(a.authored), a.response))


def administrations(observations: Iterable[Mapping[str, Any]], scales: Iterable[str]) -> list[Administration]:
    """The administrations the scale and alliance Observations describe, oldest first (by
    ``authored``, then response id). ``scales``: the instrument's scale codes."""
    known = frozenset(scales)
    return from_facts(fact_of(obs, known) for obs in observations)
