"""The adaptive administration operations (SDC ``$next-question`` and ``$populate``, this server's
``$tailored-form`` and ``$adaptive-state``), built on the patient's record (:mod:`fhir_norse.rom.patient`).

Each runs in one repository session: the patient named must exist and be within the caller's reach
(404 otherwise, as for any resource out of reach), and the AuditEvent is written in the same
transaction as the reads.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

from fhir_norse.adaptive.forms import PAGES, FormItems, next_page, tailored_form
from fhir_norse.adaptive.history import (
    context_of,
    episode_of,
)
from fhir_norse.canonicals import BASE as _BASE
from fhir_norse.canonicals import CS_SCALES
from fhir_norse.instruments.intake import validate_response
from fhir_norse.instruments.registry import Instrument, version_key
from fhir_norse.instruments.schema import InstrumentMapping
from fhir_norse.outcomes import BadRequest, Issue, NotFound, Unprocessable
from fhir_norse.rom.intake import QuestionnaireResponseIntake
from fhir_norse.rom.patient import (
    _QR,
    CONTEXTS,
    SDC_ADAPTIVE,
    SDC_Q_ADAPT,
    SDC_QR_ADAPT,
    AdaptiveService,
    PatientState,
    context_extension,
    episode_extension,
)
from fhir_norse.rom.published_forms import publish_form
from fhir_norse.scoring.engine import answers_from_response, trigger_scores
from fhir_norse.server.context import RequestContext, Result
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.repository import JsonDict, Repository, loads
from fhir_norse.server.resources import flat_items, instant, now_ms, reference_id
from fhir_norse.server.validation import validate_resource

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


class _FormCache:
    """The adaptive canonicals' item definitions by linkId (:class:`FormItems`), built once per process
    and form version. Keyed by ``url|version`` and kept only while the resolver hands out the very same
    (cached, published, immutable) Questionnaire object: a newly published version has a key of its own,
    and a form read afresh from the database (not cached by the resolver) is never matched by a stale
    entry."""

    _LIMIT = 64

    def __init__(self) -> None:
        self._forms: dict[str, tuple[JsonDict, FormItems]] = {}

    def items(self, canonical: JsonDict) -> FormItems:
        key = f"{canonical.get('url')}|{canonical.get('version')}"
        hit = self._forms.get(key)
        if hit is not None and hit[0] is canonical:
            return hit[1]
        form = FormItems({str(i.get("linkId")): i for i in flat_items(canonical)})
        if len(self._forms) >= self._LIMIT:
            self._forms.clear()
        self._forms[key] = (canonical, form)
        return form


class AdaptiveOperations:
    """The HTTP-facing operations (module doc); one instance per server."""

    def __init__(self, adaptive: AdaptiveService, intake: QuestionnaireResponseIntake) -> None:
        self.adaptive = adaptive
        self.intake = intake
        self.forms = _FormCache()

    def _canonical(self, repo: Repository, canonical: Any) -> JsonDict:
        """The stored Questionnaire named (the intake's resolver, cached for published versions)."""
        return self.intake.questionnaire(repo, canonical)

    # -------------------------------------------------------------- $next-question
    def next_question(
        self, service: FhirService, ctx: RequestContext, body: Mapping[str, Any] | None
    ) -> Result:
        operation = "operation:next-question"
        with service.audited_session(ctx, operation, "Questionnaire") as repo:
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
            patient = repo.require_patient(
                (response.get("subject") or {}).get("reference"),
                interaction=operation,
                res_type=_QR,
                expression="QuestionnaireResponse.subject",
            )
            server = repo.as_server()
            contained, canonical, instrument, form = self._contained(server, response)
            mapping = cast(InstrumentMapping, instrument.mapping)
            episode = self.adaptive.episode(server, response)
            state = self.adaptive.patient_state(
                server, patient, mapping, episode=episode, context=context_of(response)
            )
            problems = validate_response(response, contained, mapping=mapping)
            if problems:
                raise Unprocessable(problems[0].diagnostics, issues=problems)
            repo.audit(operation, "Questionnaire", None, patients=[patient.split("/")[1]])
            delivered = [str(i.get("linkId")) for i in contained.get("item") or []]
            triggers = trigger_scores(answers_from_response(response), mapping)
            page = next_page(state.plan, form, delivered, triggers, str(canonical.get("language") or "nb"))
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
        self, repo: Repository, response: JsonDict
    ) -> tuple[JsonDict, JsonDict, Instrument, FormItems]:
        """The contained Questionnaire (created on the first call when the response names the adaptive
        canonical instead), the canonical it derives from, the instrument scoring it, and the
        canonical's item definitions."""
        reference = response.get("questionnaire")
        if isinstance(reference, str) and not reference.startswith("#"):
            # A convenience for the first call: name the adaptive canonical, get the contained form.
            canonical = self._canonical(repo, reference)
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
        canonical = self._canonical(repo, derived[0])
        instrument = self.adaptive.instrument(f"{canonical.get('url')}|{canonical.get('version')}")
        mapping = instrument.mapping if instrument is not None else None
        if instrument is None or not isinstance(mapping, InstrumentMapping):
            raise Unprocessable(
                f"{derived[0]} is not an adaptive Questionnaire of this server",
                code="not-supported",
                expression="QuestionnaireResponse.contained.derivedFrom",
            )
        source = self.adaptive.registry.source_of(str(canonical.get("url")), canonical.get("version"))[0]
        if source != mapping.questionnaires.adaptive:
            raise Unprocessable(
                f"$next-question pages the adaptive form {mapping.questionnaires.adaptive}; "
                f"{canonical.get('url')} is a static form (use $tailored-form or $populate)",
                code="not-supported",
                expression="QuestionnaireResponse.contained.derivedFrom",
            )
        form = self.forms.items(canonical)
        _check_pages(contained, form)
        return contained, canonical, instrument, form

    # -------------------------------------------------------------- tailored static form
    def tailored_form(
        self,
        repo: Repository,
        patient_id: str,
        params: Mapping[str, str],
        operation: str = "operation:tailored-form",
    ) -> tuple[JsonDict, PatientState]:
        """The static form tailored to the patient, stored under its own canonical (form fillers fetch
        it by url and answer it by ``url|version``; :mod:`fhir_norse.rom.published_forms`)."""
        static, state = self._patient_plan(repo, patient_id, params, operation)
        return publish_form(repo, tailored_form(static, state.plan)), state

    def _patient_plan(
        self, repo: Repository, patient_id: str, params: Mapping[str, str], operation: str
    ) -> tuple[JsonDict, PatientState]:
        """The static canonical and the patient's state for the GET operations on a patient."""
        patient = repo.require_patient(
            f"Patient/{patient_id}", interaction=operation, res_type=_QR, expression="Patient"
        )
        server = repo.as_server()
        static, mapping = self._static(server, params.get("questionnaire"))
        episode = params.get("episode") or self.adaptive.active_episode(server, patient)
        if reference_id(episode, "EpisodeOfCare") is None and episode is not None:
            raise Unprocessable(f"episode {episode!r} is not an EpisodeOfCare reference", code="value")
        state = self.adaptive.patient_state(
            server, patient, mapping, episode=episode, context=_context_param(params.get("context"))
        )
        return static, state

    def _static(self, repo: Repository, canonical: str | None) -> tuple[JsonDict, InstrumentMapping]:
        mappings = self.adaptive.adaptive_mappings()
        if canonical is None:
            # One adaptive instrument: its newest version (the one a new administration uses).
            if len({m.instrument for m in mappings}) != 1:
                raise BadRequest("name the static Questionnaire (questionnaire=url|version)", code="required")
            newest = max(mappings, key=lambda m: version_key(m.version))
            canonical = newest.questionnaires.static
            if "|" not in canonical:
                canonical = f"{canonical}|{newest.version}"
        static = self._canonical(repo, canonical)
        instrument = self.adaptive.instrument(f"{static.get('url')}|{static.get('version')}")
        mapping = instrument.mapping if instrument is not None else None
        source = self.adaptive.registry.source_of(str(static.get("url")), static.get("version"))[0]
        if not isinstance(mapping, InstrumentMapping) or source != mapping.questionnaires.static:
            raise Unprocessable(
                f"{canonical} is not the static form of an adaptive instrument", code="not-supported"
            )
        return static, mapping

    def on_patient(
        self,
        service: FhirService,
        ctx: RequestContext,
        name: str,
        patient_id: str,
        params: Mapping[str, str],
    ) -> Result:
        """``Patient/{id}/$tailored-form`` (the tailored Questionnaire) or ``$adaptive-state`` (the state
        as Parameters), read and audited in one session."""
        operation = f"operation:{name}"
        with service.audited_session(ctx, operation, "Patient", patient_id) as repo:
            if name == "tailored-form":
                body, _ = self.tailored_form(repo, patient_id, params, operation)
            else:
                body = _state_parameters(self._patient_plan(repo, patient_id, params, operation)[1])
            repo.audit(operation, "Patient", patient_id, patients=[patient_id])
        return Result(200, body=body)

    def populate(
        self,
        service: FhirService,
        ctx: RequestContext,
        questionnaire_id: str | None,
        params: Mapping[str, str],
    ) -> Result:
        """SDC ``$populate``: a QuestionnaireResponse to fill, holding the tailored form as contained."""
        operation = "operation:populate"
        with service.audited_session(ctx, operation, "Questionnaire", questionnaire_id) as repo:
            subject = params.get("subject")
            patient_id = reference_id(subject, "Patient")
            if patient_id is None:
                raise BadRequest("$populate needs subject=Patient/<id>", code="required")
            canonical = params.get("questionnaire") or params.get("canonical")
            if questionnaire_id is not None:
                stored = repo.get("Questionnaire", questionnaire_id)
                if stored is None:
                    raise NotFound(f"Questionnaire/{questionnaire_id} is not known")
                body = loads(stored.body_text)
                canonical = f"{body.get('url')}|{body.get('version')}"
            form, state = self.tailored_form(
                repo,
                patient_id,
                {**params, **({"questionnaire": canonical} if canonical else {})},
                operation,
            )
            response: JsonDict = {
                "resourceType": _QR,
                "meta": {"profile": [f"{_BASE}/StructureDefinition/rom-questionnaire-response"]},
                # The stored form, contained (a contained resource has no meta of its own).
                "contained": [{**{k: v for k, v in form.items() if k != "meta"}, "id": "tailored"}],
                "questionnaire": "#tailored",
                "status": "in-progress",
                "subject": {"reference": f"Patient/{patient_id}"},
            }
            _stamp(response, state)
            repo.audit(operation, "Questionnaire", questionnaire_id, patients=[patient_id])
            return Result(
                200,
                body={
                    "resourceType": "Parameters",
                    "parameter": [{"name": "response", "resource": response}],
                },
            )


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


def _check_pages(contained: Mapping[str, Any], items: FormItems) -> None:
    """The contained form holds only pages this server delivers, each item exactly as the canonical
    defines it (so nothing in it needs validating again)."""
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
