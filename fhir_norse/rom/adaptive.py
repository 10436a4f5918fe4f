"""Adaptive administration on the server: per-patient scale state from the stored history, clinician
overrides, and the operations built on them.

* **Episode.** An administration belongs to the EpisodeOfCare its response names (extension
  ``workflow-episodeOfCare``), else the episode of its ``encounter``, else the patient's only active
  EpisodeOfCare, else none. Scale state, change and the intake context are counted within the episode
  (administrations without an episode form one series of their own).
* **Context.** ``administration-context`` (intake | weekly | termination) from the response; without one,
  ``intake`` for the first administration of the episode and ``weekly`` after it. Contexts listed in the
  mapping's ``full_bank_contexts`` ask every scale in full.
* **State.** :func:`fhir_norse.adaptive.state.scale_states` over the episode's scored administrations
  (:mod:`fhir_norse.adaptive.history`) with the active overrides. Nothing else is kept between calls.
* **Overrides** are ``ServiceRequest`` resources (profile ``rom-scale-override``): ``code`` the scale,
  ``doNotPerform`` false to force it open (asked in full every time) or true to force it closed (only the
  trigger), ``requester`` who, ``authoredOn`` when, ``reasonCode``/``note`` why, ``status`` active while
  it holds (revoked, completed or entered-in-error lifts it), optionally limited to an episode with the
  ``workflow-episodeOfCare`` extension. They are read, searched, changed and audited like any resource
  (every write has its AuditEvent and its version in the history); the newest active one per scale wins.
* **Operations**: ``Questionnaire/$next-question`` (SDC adaptive forms), ``Patient/{id}/$tailored-form``
  (a tailored static Questionnaire), ``Questionnaire/$populate`` (the same form contained in a
  QuestionnaireResponse to fill), and ``Patient/{id}/$adaptive-state`` (the state, scale by scale).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlencode

import orjson

from fhir_norse.adaptive.forms import PAGES, AdministrationPlan, next_page, tailored_questionnaire
from fhir_norse.adaptive.history import (
    CONTEXT_EXTENSION,
    CS_CONTEXT,
    EPISODE_EXTENSION,
    Administration,
    Fact,
    context_of,
    episode_of,
    fact_of,
    from_facts,
    moment,
)
from fhir_norse.adaptive.state import Override, ScaleState, scale_states
from fhir_norse.instruments.intake import validate_response
from fhir_norse.instruments.registry import Instrument, InstrumentRegistry
from fhir_norse.instruments.schema import InstrumentMapping
from fhir_norse.outcomes import BadRequest, Forbidden, Issue, NotFound, Unprocessable
from fhir_norse.scoring.engine import answers_from_response, trigger_scores
from fhir_norse.server.context import RequestContext, Result
from fhir_norse.server.interactions import FhirService, JsonDict, WriteOutcome, loads
from fhir_norse.server.resources import flat_items, instant, now_ms, reference_id
from fhir_norse.server.search.parse import parse_search
from fhir_norse.server.validation import validate_resource
from fhir_norse.store.search import engine
from fhir_norse.store.storage import ReadView, StoredResource, UnitOfWork

__all__ = [
    "CS_SCALES",
    "OVERRIDE_CATEGORY",
    "PROFILE_OVERRIDE",
    "AdaptiveService",
    "ScaleOverrideHook",
]

_BASE = "http://fhir-norse.org/fhir"
CS_SCALES = f"{_BASE}/CodeSystem/nf21-scales"
CS_ROM = f"{_BASE}/CodeSystem/rom-codes"
PROFILE_OVERRIDE = f"{_BASE}/StructureDefinition/rom-scale-override"
OVERRIDE_CATEGORY = "scale-override"
SDC_QR_ADAPT = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaireresponse-adapt"
SDC_Q_ADAPT = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-adapt"
SDC_ADAPTIVE = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-questionnaireAdaptive"
CONTEXTS = ("intake", "weekly", "termination")
_LIMIT = 100_000
_FACT_CACHE = 200_000
_QR = "QuestionnaireResponse"
_CONTEXT_DISPLAY = {"intake": "Intake", "weekly": "Weekly", "termination": "Termination"}


def context_extension(code: str) -> JsonDict:
    return {
        "url": CONTEXT_EXTENSION,
        "valueCoding": {"system": CS_CONTEXT, "code": code, "display": _CONTEXT_DISPLAY.get(code, code)},
    }


def episode_extension(episode: str) -> JsonDict:
    return {"url": EPISODE_EXTENSION, "valueReference": {"reference": episode}}


@dataclass(frozen=True)
class OverrideRecord:
    """One active clinician override, as the state operation shows it."""

    scale: str
    override: Override
    request: str  # ServiceRequest/<id>
    requester: str | None
    authored: str | None
    reason: str | None


@dataclass
class PatientState:
    """Everything adaptive administration knows about one patient (in one episode) right now."""

    mapping: InstrumentMapping
    patient: str  # Patient/<id>
    episode: str | None
    context: str
    history: list[Administration]
    states: dict[str, ScaleState]
    overrides: dict[str, OverrideRecord] = field(default_factory=dict)

    @property
    def plan(self) -> AdministrationPlan:
        return AdministrationPlan(
            self.mapping, self.states, full_bank=self.context in self.mapping.full_bank_contexts
        )


def override_of(body: Mapping[str, Any]) -> tuple[str, Override] | None:
    """(scale code, 'open' | 'closed') of an active scale-override ServiceRequest, else None."""
    if body.get("status") != "active" or not _is_override(body):
        return None
    code = next(
        (c.get("code") for c in (body.get("code") or {}).get("coding") or [] if c.get("system") == CS_SCALES),
        None,
    )
    if not isinstance(code, str):
        return None
    return code, ("closed" if body.get("doNotPerform") is True else "open")


def _is_override(body: Mapping[str, Any]) -> bool:
    if PROFILE_OVERRIDE in ((body.get("meta") or {}).get("profile") or []):
        return True
    return any(
        c.get("system") == CS_ROM and c.get("code") == OVERRIDE_CATEGORY
        for cat in body.get("category") or []
        for c in cat.get("coding") or []
    )


class AdaptiveService:
    """Reads the stored history and overrides of a patient and turns them into the adaptive plan."""

    def __init__(self, registry: InstrumentRegistry) -> None:
        self.registry = registry
        # Parsed stored versions (immutable), not state: the same answers with an empty cache.
        self._facts: dict[tuple[str, int, frozenset[str]], Fact | None] = {}

    # ------------------------------------------------------------------ instruments
    def adaptive_mappings(self) -> list[InstrumentMapping]:
        return [i.mapping for i in self.registry if isinstance(i.mapping, InstrumentMapping)]

    def instrument(self, canonical: str) -> Instrument | None:
        url, _, version = canonical.partition("|")
        return self.registry.for_questionnaire(url, version or None)

    # ------------------------------------------------------------------ reads
    def episode(self, service: FhirService, reader: ReadView, response: Mapping[str, Any]) -> str | None:
        """The EpisodeOfCare of an administration (module doc)."""
        explicit = episode_of(response)
        if explicit is not None:
            return explicit
        encounter_id = reference_id((response.get("encounter") or {}).get("reference"), "Encounter")
        if encounter_id is not None:
            stored = reader.current("Encounter", encounter_id)
            if stored is not None and not stored.deleted:
                episodes = loads(stored.body_text).get("episodeOfCare") or []
                ref = (episodes[0] if episodes else {}).get("reference")
                if reference_id(ref, "EpisodeOfCare") is not None:
                    return f"EpisodeOfCare/{reference_id(ref, 'EpisodeOfCare')}"
        patient = (response.get("subject") or {}).get("reference")
        if not isinstance(patient, str):
            return None
        return self.active_episode(service, reader, patient)

    def active_episode(self, service: FhirService, reader: ReadView, patient_ref: str) -> str | None:
        query = urlencode({"patient": patient_ref, "status": "active"})
        found = service.find_matching(reader, "EpisodeOfCare", query, 2)
        return f"EpisodeOfCare/{found[0].res_id}" if len(found) == 1 else None

    def history(
        self,
        service: FhirService,
        reader: ReadView,
        patient_ref: str,
        mapping: InstrumentMapping,
        episode: str | None,
        *,
        exclude_response: str | None = None,
    ) -> list[Administration]:
        """The patient's scored administrations of ``mapping`` in ``episode``, oldest first (scale
        and alliance scores)."""
        # By subject only, filtered here: adding ``code`` makes PostgreSQL without fresh statistics
        # plan a nested loop over every code row (1.4 s seen); the facts of other Observations are
        # remembered as "nothing" after their first read.
        query = {"subject": patient_ref}
        scales = frozenset(s.code for s in mapping.scales)
        # Ids and versions first; only the versions not read before are fetched and parsed.
        request = parse_search("Observation", list(query.items()), strict=True, registry=service.registry)
        found = engine.find_versions(reader.conn, request, _LIMIT)
        known: dict[int, Fact | None] = {}
        missing: list[tuple[int, tuple[str, int, frozenset[str]]]] = []
        for pk, rid, version in found:
            key = (rid, version, scales)
            if key in self._facts:
                known[pk] = self._facts[key]
            else:
                missing.append((pk, key))
        if missing:
            texts = engine.bodies(reader.conn, [pk for pk, _ in missing])
            if len(self._facts) + len(missing) > _FACT_CACHE:
                self._facts.clear()
            for pk, key in missing:
                known[pk] = self._facts[key] = _parse_fact(texts.get(pk), scales)
        every = from_facts(known[pk] for pk, _, _ in found)
        return [a for a in every if a.episode == episode and a.response != exclude_response]

    def overrides(
        self, service: FhirService, reader: ReadView, patient_ref: str, episode: str | None
    ) -> dict[str, OverrideRecord]:
        """The active overrides for the patient (episode-bound ones only in their episode)."""
        found = service.find_matching(reader, "ServiceRequest", urlencode({"subject": patient_ref}), _LIMIT)
        chosen: dict[str, tuple[str, OverrideRecord]] = {}
        for stored in found:
            body = loads(stored.body_text)
            parsed = override_of(body)
            if parsed is None:
                continue
            bound = episode_of(body)
            if bound is not None and bound != episode:
                continue
            scale, kind = parsed
            authored = body.get("authoredOn")
            reason = "; ".join(
                [str(r.get("text")) for r in body.get("reasonCode") or [] if r.get("text")]
                + [str(n.get("text")) for n in body.get("note") or [] if n.get("text")]
            )
            record = OverrideRecord(
                scale,
                kind,
                f"ServiceRequest/{stored.res_id}",
                (body.get("requester") or {}).get("reference"),
                authored,
                reason or None,
            )
            rank = f"{moment(authored).isoformat() if authored else ''}|{stored.last_updated}"
            if scale not in chosen or rank > chosen[scale][0]:
                chosen[scale] = (rank, record)
        return {scale: record for scale, (_, record) in chosen.items()}

    def patient_state(
        self,
        service: FhirService,
        reader: ReadView,
        patient_ref: str,
        mapping: InstrumentMapping,
        *,
        episode: str | None,
        context: str | None,
        exclude_response: str | None = None,
        before: str | None = None,
    ) -> PatientState:
        """The state before the next administration (or before ``before``, an ``authored`` time)."""
        history = self.history(
            service, reader, patient_ref, mapping, episode, exclude_response=exclude_response
        )
        if before is not None:
            cutoff = moment(before)
            history = [a for a in history if moment(a.authored) < cutoff]
        overrides = self.overrides(service, reader, patient_ref, episode)
        states = scale_states(
            mapping, [a.measured for a in history], {s: o.override for s, o in overrides.items()}
        )
        resolved = context or ("intake" if not history else "weekly")
        return PatientState(mapping, patient_ref, episode, resolved, history, states, overrides)


# ---------------------------------------------------------------------- the override write hook


class ScaleOverrideHook:
    """Checks clinician overrides (ServiceRequest ``rom-scale-override``) before they are stored; other
    ServiceRequests pass untouched."""

    def __init__(self, registry: InstrumentRegistry) -> None:
        self.registry = registry

    def existing(
        self, service: FhirService, uow: UnitOfWork, body: JsonDict, patients: frozenset[str] | None
    ) -> StoredResource | None:
        return None

    def before_save(
        self,
        service: FhirService,
        uow: UnitOfWork,
        ctx: RequestContext,
        res_id: str,
        body: JsonDict,
        previous: StoredResource | None,
    ) -> None:
        if not _is_override(body):
            return
        issues: list[Issue] = []
        scales = {
            s.code
            for i in self.registry
            if isinstance(i.mapping, InstrumentMapping)
            for s in i.mapping.scales
        }
        codes = [c for c in (body.get("code") or {}).get("coding") or [] if c.get("system") == CS_SCALES]
        if len(codes) != 1 or codes[0].get("code") not in scales:
            given = ", ".join(str(c.get("code")) for c in codes) or "none"
            issues.append(
                Issue(
                    f"A scale override names exactly one scale of {CS_SCALES} in code (given: {given}; "
                    f"known: {', '.join(sorted(scales))})",
                    code="code-invalid",
                    expression=("ServiceRequest.code",),
                )
            )
        patient_id = reference_id((body.get("subject") or {}).get("reference"), "Patient")
        patient = uow.current("Patient", patient_id) if patient_id else None
        if patient is None or patient.deleted:
            issues.append(
                Issue(
                    "subject must reference a Patient on this server",
                    code="not-found" if patient_id else "required",
                    expression=("ServiceRequest.subject",),
                )
            )
        if not (body.get("requester") or {}).get("reference"):
            issues.append(
                Issue(
                    "requester (the clinician who decides) is required on a scale override",
                    code="required",
                    expression=("ServiceRequest.requester",),
                )
            )
        if not body.get("authoredOn"):
            issues.append(
                Issue(
                    "authoredOn (when the decision was made) is required on a scale override",
                    code="required",
                    expression=("ServiceRequest.authoredOn",),
                )
            )
        has_reason = any(r.get("text") or r.get("coding") for r in body.get("reasonCode") or []) or any(
            n.get("text") for n in body.get("note") or []
        )
        if not has_reason:
            issues.append(
                Issue(
                    "a reason (reasonCode.text or note) is required on a scale override",
                    code="required",
                    expression=("ServiceRequest.reasonCode",),
                )
            )
        if "doNotPerform" not in body:
            issues.append(
                Issue(
                    "doNotPerform must say the direction: false forces the scale open, true forces it closed",
                    code="required",
                    expression=("ServiceRequest.doNotPerform",),
                )
            )
        if body.get("intent") not in ("order", "plan", "directive", "original-order"):
            issues.append(
                Issue(
                    "intent of a scale override is 'order'",
                    code="value",
                    expression=("ServiceRequest.intent",),
                )
            )
        if issues:
            raise Unprocessable(issues[0].diagnostics, issues=issues)

    def after_save(
        self,
        service: FhirService,
        uow: UnitOfWork,
        ctx: RequestContext,
        outcome: WriteOutcome,
        previous: StoredResource | None,
    ) -> list[Issue]:
        return []

    def after_delete(
        self, service: FhirService, uow: UnitOfWork, ctx: RequestContext, deleted: StoredResource
    ) -> None:
        return None


# ---------------------------------------------------------------------- operations


def _unwrap(body: Mapping[str, Any] | None, name: str, operation: str) -> JsonDict:
    if body is None:
        raise BadRequest(f"{operation} needs a QuestionnaireResponse in the body")
    if body.get("resourceType") != "Parameters":
        return dict(body)
    for param in body.get("parameter") or []:
        if param.get("name") == name and isinstance(param.get("resource"), dict):
            return dict(param["resource"])
    raise BadRequest(f"{operation} needs the '{name}' parameter", code="required")


def _patient_checked(
    service: FhirService,
    ctx: RequestContext,
    view: ReadView,
    operation: str,
    patient_ref: Any,
    expression: str,
) -> str:
    """``Patient/<id>`` after checking it exists and that the caller may reach it (403 otherwise)."""
    patient_id = reference_id(patient_ref, "Patient")
    if patient_id is None:
        raise Unprocessable(
            "subject must reference a Patient on this server (Patient/<id>)",
            code="required" if patient_ref is None else "value",
            expression=expression,
        )
    access = service.access(ctx, operation, _QR)
    patients = service.reachable_patients(view.conn, access)
    if patients is not None and patient_id not in patients:
        raise Forbidden(f"Patient/{patient_id} is outside the patients this token may reach")
    stored = view.current("Patient", patient_id)
    if stored is None or stored.deleted:
        raise Unprocessable(
            f"Patient/{patient_id} is not known to this server", code="not-found", expression=expression
        )
    return f"Patient/{patient_id}"


def _context_param(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    code = value.rsplit("|", 1)[-1]
    if code not in CONTEXTS:
        raise Unprocessable(
            f"context {value!r} is not an administration context ({' | '.join(CONTEXTS)})",
            code="code-invalid",
        )
    return code


class AdaptiveOperations:
    """The HTTP-facing operations (module doc); one instance per server."""

    def __init__(self, adaptive: AdaptiveService, canonical: Any) -> None:
        self.adaptive = adaptive
        # ``canonical(service, reader, url|version) -> Questionnaire`` (the intake's resolver, cached).
        self._canonical = canonical

    # -------------------------------------------------------------- $next-question
    def next_question(
        self, service: FhirService, ctx: RequestContext, body: Mapping[str, Any] | None
    ) -> Result:
        operation = "operation:next-question"
        with service.refusals_audited(ctx, operation, "Questionnaire"):
            response = _unwrap(body, "questionnaire-response", "$next-question")
            # The contained form is checked item by item against the canonical below; the rest of the
            # working response by the R4 definitions (it is stored, and fully validated, only later).
            validate_resource(_skeleton(response), expected_type=_QR, model=False)
            if response.get("status", "in-progress") != "in-progress":
                raise Unprocessable(
                    "$next-question continues an in-progress response "
                    f"(status is {response.get('status')!r})",
                    code="business-rule",
                    expression="QuestionnaireResponse.status",
                )
            # One transaction reads the history and records the AuditEvent: one commit per call.
            with service.repo.write() as view:
                patient = _patient_checked(
                    service,
                    ctx,
                    view,
                    operation,
                    (response.get("subject") or {}).get("reference"),
                    "QuestionnaireResponse.subject",
                )
                contained, canonical, instrument = self._contained(service, view, response)
                mapping = cast(InstrumentMapping, instrument.mapping)
                episode = self.adaptive.episode(service, view, response)
                state = self.adaptive.patient_state(
                    service, view, patient, mapping, episode=episode, context=context_of(response)
                )
                problems = validate_response(response, contained, mapping=mapping)
                if problems:
                    raise Unprocessable(problems[0].diagnostics, issues=problems)
                service.record(
                    view,
                    service.audit_event(
                        ctx, operation, "success", "Questionnaire", None, patients=[patient.split("/")[1]]
                    ),
                )
            delivered = [str(i.get("linkId")) for i in contained.get("item") or []]
            triggers = trigger_scores(answers_from_response(response), mapping)
            canonical_items = {str(i.get("linkId")): i for i in flat_items(canonical)}
            page = next_page(
                state.plan, canonical_items, delivered, triggers, str(canonical.get("language") or "nb")
            )
            out = response  # parsed for this request only: answered in place
            if page is not None:
                contained.setdefault("item", []).append(page)
                out["status"] = "in-progress"
            else:
                out["status"] = "completed"
                out.setdefault("authored", instant(now_ms()))
            _stamp(out, state)
            meta = out.setdefault("meta", {})
            if SDC_QR_ADAPT not in meta.setdefault("profile", []):
                meta["profile"].append(SDC_QR_ADAPT)
            return Result(200, body=out)

    def _contained(
        self, service: FhirService, view: ReadView, response: JsonDict
    ) -> tuple[JsonDict, JsonDict, Instrument]:
        """The contained Questionnaire (created on the first call when the response names the adaptive
        canonical instead), the canonical it derives from, and the instrument scoring it."""
        reference = response.get("questionnaire")
        if isinstance(reference, str) and not reference.startswith("#"):
            # A convenience for the first call: name the adaptive canonical, get the contained form.
            canonical = self._canonical(service, view, reference)
            shell = {
                "resourceType": "Questionnaire",
                "id": "q",
                "meta": {"profile": [SDC_Q_ADAPT]},
                "extension": [{"url": SDC_ADAPTIVE, "valueBoolean": True}],
                "status": "active",
                "derivedFrom": [f"{canonical['url']}|{canonical.get('version')}"],
                "item": [],
            }
            for key in ("language", "title", "_title", "subjectType"):
                if key in canonical:
                    shell[key] = copy.deepcopy(canonical[key])
            if response.get("item"):
                raise Unprocessable(
                    "answers need the contained Questionnaire they answer: send back the response as "
                    "$next-question returned it",
                    code="structure",
                    expression="QuestionnaireResponse.questionnaire",
                )
            response["contained"] = [*(response.get("contained") or []), shell]
            response["questionnaire"] = "#q"
            reference = "#q"
        if not isinstance(reference, str):
            raise Unprocessable(
                "questionnaire must name the contained Questionnaire (#id) that derives from an adaptive "
                "Questionnaire, or the adaptive Questionnaire's canonical to start",
                code="required",
                expression="QuestionnaireResponse.questionnaire",
            )
        contained = next(
            (
                c
                for c in response.get("contained") or []
                if c.get("resourceType") == "Questionnaire" and f"#{c.get('id')}" == reference
            ),
            None,
        )
        if contained is None:
            raise Unprocessable(
                f"questionnaire {reference} names no contained Questionnaire",
                code="not-found",
                expression="QuestionnaireResponse.questionnaire",
            )
        derived = [d for d in contained.get("derivedFrom") or [] if isinstance(d, str)]
        if not derived:
            raise Unprocessable(
                "the contained Questionnaire must name the adaptive Questionnaire it derives from "
                "(derivedFrom)",
                code="required",
                expression="QuestionnaireResponse.contained.derivedFrom",
            )
        canonical = self._canonical(service, view, derived[0])
        instrument = self.adaptive.instrument(f"{canonical.get('url')}|{canonical.get('version')}")
        mapping = instrument.mapping if instrument is not None else None
        if instrument is None or not isinstance(mapping, InstrumentMapping):
            raise Unprocessable(
                f"{derived[0]} is not an adaptive Questionnaire of this server",
                code="not-supported",
                expression="QuestionnaireResponse.contained.derivedFrom",
            )
        if canonical.get("url") != mapping.questionnaires.adaptive:
            raise Unprocessable(
                f"$next-question pages the adaptive form {mapping.questionnaires.adaptive}; "
                f"{canonical.get('url')} is a static form (use $tailored-form or $populate)",
                code="not-supported",
                expression="QuestionnaireResponse.contained.derivedFrom",
            )
        _check_pages(contained, canonical)
        return contained, canonical, instrument

    # -------------------------------------------------------------- tailored static form
    def tailored_form(
        self,
        service: FhirService,
        ctx: RequestContext,
        patient_id: str,
        params: Mapping[str, str],
        operation: str = "operation:tailored-form",
    ) -> tuple[JsonDict, PatientState]:
        static, state = self._patient_plan(service, ctx, patient_id, params, operation)
        patient = state.patient
        form = tailored_questionnaire(static, state.plan)
        for key in ("id", "meta", "url", "identifier", "text"):
            form.pop(key, None)
        form["id"] = "tailored"
        form["derivedFrom"] = [f"{static['url']}|{static.get('version')}"]
        form["status"] = "active"
        form["date"] = instant(now_ms())
        open_now = state.plan.in_full_regardless()
        form["description"] = (
            f"{static.get('description', '')} Tailored for {patient} ({state.context}): scales asked in full "
            f"whatever the trigger: {', '.join(open_now) or 'none'}; closed by a clinician: "
            f"{', '.join(sorted(state.plan.forced_closed())) or 'none'}."
        ).strip()
        return form, state

    def _patient_plan(
        self,
        service: FhirService,
        ctx: RequestContext,
        patient_id: str,
        params: Mapping[str, str],
        operation: str,
    ) -> tuple[JsonDict, PatientState]:
        """The static canonical and the patient's state for the GET operations on a patient."""
        with service.repo.read() as view:
            patient = _patient_checked(service, ctx, view, operation, f"Patient/{patient_id}", "Patient")
            static, mapping = self._static(service, view, params.get("questionnaire"))
            episode = params.get("episode") or self.adaptive.active_episode(service, view, patient)
            if reference_id(episode, "EpisodeOfCare") is None and episode is not None:
                raise Unprocessable(f"episode {episode!r} is not an EpisodeOfCare reference", code="value")
            state = self.adaptive.patient_state(
                service,
                view,
                patient,
                mapping,
                episode=episode,
                context=_context_param(params.get("context")),
            )
        return static, state

    def _static(
        self, service: FhirService, view: ReadView, canonical: str | None
    ) -> tuple[JsonDict, InstrumentMapping]:
        mappings = self.adaptive.adaptive_mappings()
        if canonical is None:
            if len(mappings) != 1:
                raise BadRequest("name the static Questionnaire (questionnaire=url|version)", code="required")
            canonical = mappings[0].questionnaires.static
        static = self._canonical(service, view, canonical)
        instrument = self.adaptive.instrument(f"{static.get('url')}|{static.get('version')}")
        mapping = instrument.mapping if instrument is not None else None
        if not isinstance(mapping, InstrumentMapping) or static.get("url") != mapping.questionnaires.static:
            raise Unprocessable(
                f"{canonical} is not the static form of an adaptive instrument", code="not-supported"
            )
        return static, mapping

    def tailored_form_operation(
        self, service: FhirService, ctx: RequestContext, patient_id: str, params: Mapping[str, str]
    ) -> Result:
        operation = "operation:tailored-form"
        with service.refusals_audited(ctx, operation, "Patient", patient_id):
            form, _ = self.tailored_form(service, ctx, patient_id, params, operation)
            service.record_now(
                service.audit_event(ctx, operation, "success", "Patient", patient_id, patients=[patient_id])
            )
            return Result(200, body=form)

    def populate(
        self,
        service: FhirService,
        ctx: RequestContext,
        questionnaire_id: str | None,
        params: Mapping[str, str],
    ) -> Result:
        """SDC ``$populate``: a QuestionnaireResponse to fill, holding the tailored form as contained."""
        operation = "operation:populate"
        with service.refusals_audited(ctx, operation, "Questionnaire", questionnaire_id):
            subject = params.get("subject")
            patient_id = reference_id(subject, "Patient")
            if patient_id is None:
                raise BadRequest("$populate needs subject=Patient/<id>", code="required")
            canonical = params.get("questionnaire") or params.get("canonical")
            if questionnaire_id is not None:
                with service.repo.read() as view:
                    stored = view.current("Questionnaire", questionnaire_id)
                if stored is None or stored.deleted:
                    raise NotFound(f"Questionnaire/{questionnaire_id} is not known")
                body = loads(stored.body_text)
                canonical = f"{body.get('url')}|{body.get('version')}"
            form, state = self.tailored_form(
                service,
                ctx,
                patient_id,
                {**params, **({"questionnaire": canonical} if canonical else {})},
                operation,
            )
            response: JsonDict = {
                "resourceType": _QR,
                "meta": {"profile": [f"{_BASE}/StructureDefinition/rom-questionnaire-response"]},
                "contained": [form],
                "questionnaire": f"#{form['id']}",
                "status": "in-progress",
                "subject": {"reference": f"Patient/{patient_id}"},
            }
            _stamp(response, state)
            service.record_now(
                service.audit_event(
                    ctx, operation, "success", "Questionnaire", questionnaire_id, patients=[patient_id]
                )
            )
            return Result(
                200,
                body={
                    "resourceType": "Parameters",
                    "parameter": [{"name": "response", "resource": response}],
                },
            )

    # -------------------------------------------------------------- $adaptive-state
    def state_operation(
        self, service: FhirService, ctx: RequestContext, patient_id: str, params: Mapping[str, str]
    ) -> Result:
        operation = "operation:adaptive-state"
        with service.refusals_audited(ctx, operation, "Patient", patient_id):
            _, state = self._patient_plan(service, ctx, patient_id, params, operation)
            service.record_now(
                service.audit_event(ctx, operation, "success", "Patient", patient_id, patients=[patient_id])
            )
            return Result(200, body=_state_parameters(state))


def _parse_fact(text: str | None, scales: frozenset[str]) -> Fact | None:
    # Cheap filter before parsing: only scale and alliance scores matter here.
    if not text or ("/nf21-scales" not in text and "/nf21-alliance" not in text):
        return None
    return fact_of(orjson.loads(text), scales)


_PAGE_KEYS = frozenset({"extension", "linkId", "text", "_text", "type", "item"})


def _skeleton(response: Mapping[str, Any]) -> JsonDict:
    """The response with its contained forms' items left out (they are checked against the canonical)."""
    out = dict(response)
    if isinstance(out.get("contained"), list):
        out["contained"] = [
            {k: v for k, v in c.items() if k != "item"} if isinstance(c, dict) else c
            for c in out["contained"]
        ]
    return out


def _check_pages(contained: Mapping[str, Any], canonical: Mapping[str, Any]) -> None:
    """The contained form holds only pages this server delivers, each item exactly as the canonical
    defines it (so nothing in it needs validating again)."""
    items = {str(i.get("linkId")): i for i in flat_items(canonical)}
    issues: list[Issue] = []
    seen: list[str] = []
    pages = contained.get("item") or []
    if not isinstance(pages, list):
        raise Unprocessable("the contained Questionnaire's item must be a list", code="structure")
    for n, page in enumerate(pages):
        where = f"QuestionnaireResponse.contained.item[{n}]"
        if (
            not isinstance(page, dict)
            or page.get("linkId") not in PAGES
            or page.get("type") != "group"
            or page.get("linkId") in seen
            or not set(page) <= _PAGE_KEYS
            or not isinstance(page.get("item"), list)
        ):
            issues.append(
                Issue(f"{where}: not a page this server delivered", code="structure", expression=(where,))
            )
            continue
        seen.append(str(page["linkId"]))
        for m, item in enumerate(page["item"]):
            defined = items.get(str(item.get("linkId"))) if isinstance(item, dict) else None
            if defined is None or item != defined:
                link_id = item.get("linkId") if isinstance(item, dict) else None
                issues.append(
                    Issue(
                        f"{where}.item[{m}] ({link_id!r}) is not the canonical item definition",
                        code="structure",
                        expression=(f"{where}.item[{m}]",),
                    )
                )
    if issues:
        raise Unprocessable(issues[0].diagnostics, issues=issues)


def _stamp(response: JsonDict, state: PatientState) -> None:
    """Put the administration context and the episode on a response, unless it names them already."""
    extensions = response.setdefault("extension", [])
    if context_of(response) is None:
        extensions.append(context_extension(state.context))
    if episode_of(response) is None and state.episode is not None:
        extensions.append(episode_extension(state.episode))


def _state_parameters(state: PatientState) -> JsonDict:
    """The state as a Parameters resource: one ``scale`` part per scale, in display order."""
    parts: list[JsonDict] = []
    last = state.history[-1] if state.history else None
    regardless = set(state.plan.in_full_regardless())
    for code in state.mapping.display_order:
        s = state.states[code]
        scale_parts: list[JsonDict] = [
            {"name": "code", "valueCoding": {"system": CS_SCALES, "code": code}},
            {"name": "open", "valueBoolean": s.open},
            {
                "name": "askedInFull",
                "valueBoolean": code in regardless,
            },
            {"name": "fullScoresCounted", "valueInteger": len(s.full_scores)},
        ]
        if s.mean_last is not None:
            scale_parts.append({"name": "meanOfLast", "valueDecimal": round(s.mean_last, 4)})
        measured = last.measured.get(code) if last is not None else None
        if measured is not None and measured.trigger is not None:
            scale_parts.append({"name": "lastTrigger", "valueDecimal": measured.trigger})
        override = state.overrides.get(code)
        if override is not None:
            detail: list[JsonDict] = [
                {"name": "direction", "valueCode": override.override},
                {"name": "request", "valueReference": {"reference": override.request}},
            ]
            if override.requester:
                detail.append({"name": "requester", "valueReference": {"reference": override.requester}})
            if override.authored:
                detail.append({"name": "authoredOn", "valueDateTime": override.authored})
            if override.reason:
                detail.append({"name": "reason", "valueString": override.reason})
            scale_parts.append({"name": "override", "part": detail})
        parts.append({"name": "scale", "part": scale_parts})
    head: list[JsonDict] = [
        {"name": "patient", "valueReference": {"reference": state.patient}},
        {"name": "context", "valueCoding": context_extension(state.context)["valueCoding"]},
        {"name": "administrations", "valueInteger": len(state.history)},
    ]
    if state.episode is not None:
        head.append({"name": "episode", "valueReference": {"reference": state.episode}})
    return {"resourceType": "Parameters", "parameter": head + parts}
