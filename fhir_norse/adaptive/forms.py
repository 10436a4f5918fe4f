"""What one administration asks, as FHIR Questionnaire content (pure: state and canonical in, items out).

Two shapes of the same decision (:class:`AdministrationPlan`):

* **Pages for SDC ``$next-question``** (https://hl7.org/fhir/uv/sdc/STU3/adaptive.html): each call appends
  one group item to the contained Questionnaire. ``page-triggers`` holds every scale's trigger; then
  ``page-scales`` the other items of the scales asked in full (open before this administration, forced
  open, opened by this administration's triggers, or every scale in a full-bank context), skipped when
  there are none; then ``page-closing`` the alliance, preference, single and medication items. Items are
  copies of the adaptive canonical's item definitions (texts, translations, codes, answer value sets).
* **A tailored static form** for fillers that cannot page: the static canonical with the groups of scales
  asked in full whatever the trigger stripped of their ``enableWhen``, the groups of scales a clinician
  closed removed (their triggers stay), and every other group kept with its ``enableWhen`` on the
  trigger, so a scale still opens within the administration. As a Questionnaire of its own
  (:func:`tailored_form`) it has a canonical of its own, computed from its items: a form filler that
  fetches forms by canonical can resolve it, and the same tailoring always gives the same canonical.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from fhir_norse.adaptive.state import ScaleState, scales_to_ask
from fhir_norse.instruments.schema import InstrumentMapping

__all__ = [
    "PAGES",
    "PAGE_CLOSING",
    "PAGE_SCALES",
    "PAGE_TRIGGERS",
    "AdministrationPlan",
    "FormItems",
    "next_page",
    "tailored_form",
    "tailored_questionnaire",
]

PAGE_TRIGGERS = "page-triggers"
PAGE_SCALES = "page-scales"
PAGE_CLOSING = "page-closing"
PAGES = (PAGE_TRIGGERS, PAGE_SCALES, PAGE_CLOSING)
TRANSLATION = "http://hl7.org/fhir/StructureDefinition/translation"
ITEM_CONTROL = "http://hl7.org/fhir/StructureDefinition/questionnaire-itemControl"
_CLOSING_TITLE = {
    "nb": "Samarbeid, ønsker og andre spørsmål",
    "en": "Working together, wishes and other questions",
}


@dataclass(frozen=True)
class AdministrationPlan:
    """The adaptive decision for one administration of ``mapping`` for one patient."""

    mapping: InstrumentMapping
    states: Mapping[str, ScaleState]  # before this administration
    full_bank: bool = False  # a full-bank context (intake): every scale in full

    def forced_closed(self) -> frozenset[str]:
        return frozenset(c for c, s in self.states.items() if s.override == "closed")

    def in_full_regardless(self) -> list[str]:
        """Scales asked in full whatever this administration's triggers say, in display order."""
        closed = self.forced_closed()
        if self.full_bank:
            return [c for c in self.mapping.display_order if c not in closed]
        return [c for c in self.mapping.display_order if c in self.states and self.states[c].asked_in_full]

    def in_full(self, triggers: Mapping[str, float | None]) -> list[str]:
        """Scales asked in full given this administration's triggers (problem direction, by linkId)."""
        if self.full_bank:
            return self.in_full_regardless()
        return scales_to_ask(self.mapping, self.states, triggers)

    def trigger_items(self) -> list[str]:
        return [s.trigger for s in (self.mapping.scale(c) for c in self.mapping.display_order) if s.trigger]

    def scale_items(self, scales: Sequence[str]) -> list[str]:
        """The items other than the trigger of each scale, scale by scale."""
        return [i for c in scales for i in self.mapping.scale(c).items if i != self.mapping.scale(c).trigger]

    def closing_items(self) -> list[str]:
        m = self.mapping
        return (
            list(m.alliance.items)
            + [p.link_id for p in m.preferences]
            + [s.link_id for s in m.single]
            + [s.link_id for s in m.medication]
        )

    def asked(self, triggers: Mapping[str, float | None]) -> list[str]:
        """Every linkId this administration asks, in order (the burden)."""
        return self.trigger_items() + self.scale_items(self.in_full(triggers)) + self.closing_items()


def _text(titles: Mapping[str, str], language: str) -> dict[str, Any]:
    """``text`` in the form's language with translations of the others (FHIR translation extension)."""
    main = titles.get(language) or next(iter(titles.values()))
    out: dict[str, Any] = {"text": main}
    others = [
        {
            "url": TRANSLATION,
            "extension": [{"url": "lang", "valueCode": lang}, {"url": "content", "valueString": t}],
        }
        for lang, t in titles.items()
        if lang != language
    ]
    if others:
        out["_text"] = {"extension": others}
    return out


def _section_title(mapping: InstrumentMapping, section: str) -> dict[str, str]:
    for s in mapping.sections:
        if s.id == section:
            return dict(s.title.model_dump(exclude_none=True))
    return {"en": section}


def _page(
    link_id: str, titles: Mapping[str, str], language: str, items: list[dict[str, Any]]
) -> dict[str, Any]:
    control = {
        "url": ITEM_CONTROL,
        "valueCodeableConcept": {
            "coding": [{"system": "http://hl7.org/fhir/questionnaire-item-control", "code": "page"}]
        },
    }
    return {
        "extension": [control],
        "linkId": link_id,
        **_text(titles, language),
        "type": "group",
        "item": items,
    }


class FormItems:
    """A canonical form's item definitions by linkId, built once per form version: each also as its JSON
    text, so that a page's copies are one ``orjson.loads`` of the joined texts (no walk of the definitions
    per call). Immutable once built: nothing hands out the definitions themselves, only copies."""

    __slots__ = ("_encoded", "_items")

    def __init__(self, items: Mapping[str, Mapping[str, Any]]) -> None:
        self._items = dict(items)
        self._encoded = {link_id: orjson.dumps(item) for link_id, item in self._items.items()}

    def get(self, link_id: str) -> Mapping[str, Any] | None:
        """The definition of ``link_id`` (not to be changed), or None."""
        return self._items.get(link_id)

    def copies(self, link_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Fresh copies of the definitions of ``link_ids`` that the form defines, in that order."""
        parts = [self._encoded[i] for i in link_ids if i in self._encoded]
        return list(orjson.loads(b"[" + b",".join(parts) + b"]"))


def next_page(
    plan: AdministrationPlan,
    canonical_items: Mapping[str, dict[str, Any]] | FormItems,
    delivered: Sequence[str],
    triggers: Mapping[str, float | None],
    language: str = "nb",
) -> dict[str, Any] | None:
    """The next page group, or None when every page has been delivered.

    ``canonical_items``: the adaptive canonical's item definitions by linkId (or built once, as
    :class:`FormItems`); ``delivered``: the page
    linkIds the contained Questionnaire holds already; ``triggers``: this administration's trigger answers
    so far (problem direction, by linkId).
    """

    form = canonical_items if isinstance(canonical_items, FormItems) else FormItems(canonical_items)

    def items(link_ids: list[str]) -> list[dict[str, Any]]:
        # A copy (the definitions stay untouched whatever the caller does); orjson is ~20x deepcopy.
        return form.copies(link_ids)

    if PAGE_TRIGGERS not in delivered:
        title = _section_title(plan.mapping, "triggers")
        return _page(PAGE_TRIGGERS, title, language, items(plan.trigger_items()))
    if PAGE_SCALES not in delivered and PAGE_CLOSING not in delivered:
        scale_items = items(plan.scale_items(plan.in_full(triggers)))
        if scale_items:
            return _page(PAGE_SCALES, _section_title(plan.mapping, "scales"), language, scale_items)
    if PAGE_CLOSING not in delivered:
        return _page(PAGE_CLOSING, _CLOSING_TITLE, language, items(plan.closing_items()))
    return None


def _group_scale(mapping: InstrumentMapping, group: Mapping[str, Any]) -> str | None:
    """The scale whose non-trigger items a static-form group holds (None for other groups)."""
    codes = set()
    for child in group.get("item") or []:
        link_id = child.get("linkId")
        try:
            scale = mapping.scale_of_item(str(link_id))
        except KeyError:
            return None
        if link_id == scale.trigger:
            return None
        codes.add(scale.code)
    return codes.pop() if len(codes) == 1 else None


def tailored_questionnaire(
    static: Mapping[str, Any], plan: AdministrationPlan, *, drop_closed: bool = True
) -> dict[str, Any]:
    """The static canonical tailored to ``plan`` (module doc). ``drop_closed=False`` keeps the groups of
    scales a clinician closed (intake validates a response to the canonical form that way: a patient who
    answered them loses nothing)."""
    regardless = set(plan.in_full_regardless())
    closed = plan.forced_closed() if drop_closed else frozenset()
    out = copy.deepcopy(dict(static))
    items: list[dict[str, Any]] = []
    for group in out.get("item") or []:
        scale = _group_scale(plan.mapping, group)
        if scale is not None and scale in closed:
            continue
        if scale is not None and scale in regardless:
            group.pop("enableWhen", None)
            group.pop("enableBehavior", None)
        items.append(group)
    out["item"] = items
    return out


def tailored_form(static: Mapping[str, Any], plan: AdministrationPlan) -> dict[str, Any]:
    """The static canonical tailored to ``plan`` as a Questionnaire of its own, without ``id``: canonical
    ``<static url>-tailored-<digest of its content>`` with the static form's version, ``derivedFrom`` the
    static ``url|version``, and nothing patient-specific, so every patient whose plan asks the same items
    shares it (and the same content always has the same canonical)."""
    source = f"{static['url']}|{static.get('version')}"
    asked = ", ".join(plan.in_full_regardless()) or "none"
    closed = ", ".join(sorted(plan.forced_closed())) or "none"
    note = f"Tailored: scales asked in full whatever the trigger: {asked}; closed by a clinician: {closed}."
    form: dict[str, Any] = {}
    for key, value in tailored_questionnaire(static, plan).items():
        if key in ("id", "meta", "text", "identifier", "date", "derivedFrom"):
            continue
        if key == "name" and isinstance(value, str):
            value = f"{value}Tailored"
        elif key == "description":
            value = f"{value} {note}"
        form[key] = value
        if key == "title":
            form["derivedFrom"] = [source]
    form.setdefault("derivedFrom", [source])
    form.setdefault("description", note)
    form["status"] = "active"
    content = {k: v for k, v in form.items() if k != "url"}
    digest = hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()
    form["url"] = f"{static['url']}-tailored-{digest[:16]}"
    return form
