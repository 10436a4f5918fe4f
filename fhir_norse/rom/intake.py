"""QuestionnaireResponse intake and scoring at the storage seam (the write hook of the type).

https://hl7.org/fhir/R4/questionnaireresponse.html, SDC https://hl7.org/fhir/uv/sdc/STU3/extraction.html.
Every create, update, patch and transaction entry of a QuestionnaireResponse passes here, inside the
write's unit of work, so a response and everything derived from it commit together or not at all:

1. **Before saving** (422 on any problem, nothing stored): the ``questionnaire`` canonical resolves to a
   stored Questionnaire (``url|version``; a bare url takes the highest version; where the content pack
   publishes the url, only its published versions count); the ``subject`` is an existing ``Patient``;
   the answers are valid for the Questionnaire (:func:`fhir_norse.instruments.intake.validate_response`);
   a completed response is not re-opened and an amendment keeps its subject and Questionnaire.
2. **After saving** a ``completed`` or ``amended`` response whose Questionnaire a mapping scores:
   Observations, the panel and the DiagnosticReport (:mod:`fhir_norse.scoring.pipeline`), change against
   the patient's earlier administrations, alert Flags (and a Task for the responsible clinician when
   urgent), and one Provenance per scoring run. A response that is stored but not scored (``in-progress``
   or ``stopped``, or to a form no mapping scores) says so in a warning of the answer.
3. **Amendments**: derived resources have ids computed from the response id and their key, so scoring
   the response again updates the same resources (status ``amended``, the earlier version kept in the
   history); one that no longer applies becomes ``entered-in-error``. A response marked
   ``entered-in-error``, or deleted, withdraws everything derived from it the same way.
4. **Retries**: a create whose ``identifier`` matches a stored response with the same content creates
   nothing (200 with the stored one); different content under the same identifier is a 409.
5. **Administration time**: ``authored`` when given. R4 makes it optional: without it the answers are
   dated by the time the server received them, the ``meta.lastUpdated`` of the version scored (an
   amendment keeps the time its earlier scores carry), and a warning says so. The response is stored
   as sent: writing the server's clock into ``authored`` would put words in the client's resource.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, cast

import orjson

from fhir_norse import __version__
from fhir_norse.adaptive.forms import tailored_questionnaire
from fhir_norse.adaptive.history import Administration, context_of, episode_of, moment
from fhir_norse.alerts.rules import Alert, AlertCode, AlertDecision
from fhir_norse.canonicals import (
    ALERT_KEY_SYSTEM,
    CS_ALERTS,
    CS_ROM,
    MAPPING_SYSTEM,
    PROFILE_FLAG,
    SOFTWARE_SYSTEM,
)
from fhir_norse.instruments.intake import validate_response
from fhir_norse.instruments.registry import Instrument, InstrumentRegistry, version_key
from fhir_norse.instruments.schema import InstrumentMapping
from fhir_norse.outcomes import Conflict, Issue, Unprocessable
from fhir_norse.rom.patient import AdaptiveService, context_extension, episode_extension
from fhir_norse.scoring.engine import answers_from_response, trigger_scores
from fhir_norse.scoring.pipeline import PriorAdministration, ScoredAdministration, score_administration
from fhir_norse.scoring.resources import (
    LOINC,
)
from fhir_norse.server.published import is_published
from fhir_norse.server.repository import Derived, JsonDict, Repository, StorageHook, WriteOutcome, loads
from fhir_norse.server.resources import flat_items, instant, new_id, now_ms, reference_id
from fhir_norse.server.search.typed import Where
from fhir_norse.store.storage import StoredResource

__all__ = [
    "ALERT_KEY_SYSTEM",
    "QuestionnaireResponseIntake",
    "ScoringPlan",
    "assemble_plan",
    "derived_id",
]

FLAG_DETAIL = "http://hl7.org/fhir/StructureDefinition/flag-detail"
FLAG_PRIORITY = "http://hl7.org/fhir/StructureDefinition/flag-priority"
FLAG_PRIORITY_CS = "http://hl7.org/fhir/flag-priority-code"
# The code (CodeSystem rom-codes) of the clinician's Task to review an urgent alert.
ALERT_REVIEW = "alert-review"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"

# Derived resource ids: uuid5(namespace, "QuestionnaireResponse/<id>#<key>").
_DERIVED_NAMESPACE = uuid.UUID("6f1c8e0a-3d4b-5a7e-9c21-4b8d0f2e6a13")
_SCORED = frozenset({"completed", "amended"})
_HISTORY_LIMIT = 100_000


def derived_id(response_id: str, key: str) -> str:
    """The id of the resource scoring derives from response ``response_id`` under ``key``."""
    return str(uuid.uuid5(_DERIVED_NAMESPACE, f"QuestionnaireResponse/{response_id}#{key}"))


@dataclass
class PlannedWrite:
    """One resource scoring writes: created (``previous`` None) or a new version of ``previous``."""

    res_type: str
    res_id: str
    body: JsonDict
    previous: StoredResource | None = None


@dataclass
class ScoringPlan:
    """Everything one scoring (or withdrawal) run writes, in order, plus its Provenance and warnings."""

    writes: list[PlannedWrite] = field(default_factory=list)
    provenance: JsonDict | None = None
    warnings: list[Issue] = field(default_factory=list)
    scored: ScoredAdministration | None = None

    def transaction(self) -> JsonDict:
        """The transaction Bundle of this plan (SDC ``$extract``): PUT by id, Provenance last."""
        entries = [
            {
                "fullUrl": f"urn:uuid:{w.res_id}",
                "resource": w.body,
                "request": {"method": "PUT", "url": f"{w.res_type}/{w.res_id}"},
            }
            for w in self.writes
        ]
        if self.provenance is not None:
            prov = dict(self.provenance)
            entries.append(
                {
                    "fullUrl": f"urn:uuid:{prov['id']}",
                    "resource": prov,
                    "request": {"method": "PUT", "url": f"Provenance/{prov['id']}"},
                }
            )
        return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _comparable(resource: JsonDict) -> JsonDict:
    return {k: v for k, v in resource.items() if k not in ("id", "meta", "text")}


def _same_answers(a: JsonDict, b: JsonDict) -> bool:
    keys = ("status", "questionnaire", "subject", "authored", "item")
    return all(a.get(k) == b.get(k) for k in keys)


class PatientRecord:
    """What one write needs to know of the patient, read once per write (validation and the scoring
    plan both use it): the forms, the instrument, the episode and, read when first needed, the other
    scored administrations of the episode (adaptive instruments), oldest first."""

    def __init__(
        self,
        form: JsonDict,
        questionnaire: JsonDict,
        instrument: Instrument | None,
        episode: str | None,
        read_administrations: Callable[[], Sequence[Administration]],
    ) -> None:
        self.form = form
        self.questionnaire = questionnaire
        self.instrument = instrument
        self.episode = episode
        self._read = read_administrations

    @cached_property
    def administrations(self) -> tuple[Administration, ...]:
        return tuple(self._read())

    def read_again_after_lock(self) -> None:
        """Forget administrations read before the patient's scoring lock was taken (only when the
        validation needed them): a concurrent run may have committed one since."""
        self.__dict__.pop("administrations", None)


class QuestionnaireResponseIntake(StorageHook):
    """The storage hook of QuestionnaireResponse (module doc)."""

    def __init__(self, registry: InstrumentRegistry, adaptive: AdaptiveService) -> None:
        self.registry = registry
        self.adaptive = adaptive
        # Published Questionnaires never change (they are read-only), so ``url|version`` is cached.
        self._published: dict[str, JsonDict] = {}

    # ------------------------------------------------------------------ resolving
    def questionnaire(self, repo: Repository, canonical: Any) -> JsonDict:
        """The stored Questionnaire a response names (422 when there is none)."""
        expression = ("QuestionnaireResponse.questionnaire",)
        if not isinstance(canonical, str) or not canonical:
            raise Unprocessable(
                "A QuestionnaireResponse must name its Questionnaire (questionnaire = url|version)",
                code="required",
                expression=list(expression),
            )
        if (cached := self._published.get(canonical)) is not None:
            return cached
        url, _, version = canonical.partition("|")
        where = Where("Questionnaire", uris={"url": url}, tokens={"version": version} if version else {})
        found = repo.as_server().find(where, _HISTORY_LIMIT)
        if not found:
            raise Unprocessable(
                f"Questionnaire {canonical} is not known to this server",
                code="not-found",
                expression=list(expression),
            )
        bodies = [loads(f.body_text) for f in found]
        # Where the content pack publishes the url, its versions are the form (a copy stored before
        # the url became read-only must not shadow it).
        published = [b for b in bodies if is_published(b)]
        best = max(published or bodies, key=lambda b: version_key(str(b.get("version") or "0")))
        if version and published:
            self._published[canonical] = best
        return best

    def forms(self, repo: Repository, response: JsonDict) -> tuple[JsonDict, JsonDict]:
        """(the form the answers are checked against, the canonical Questionnaire that scores them).

        Both are the stored Questionnaire the response names, except for a response to a form it
        contains (``questionnaire`` = ``#id``: SDC adaptive forms, tailored static forms): that form
        must derive from a stored Questionnaire (``derivedFrom``) and define each item as it does. A
        stored form no mapping scores that derives from one a mapping scores (the tailored form the
        server stores under its own canonical) is scored as that one, once it defines each item so.
        """
        reference = response.get("questionnaire")
        if not (isinstance(reference, str) and reference.startswith("#")):
            form = self.questionnaire(repo, reference)
            derived = [d for d in form.get("derivedFrom") or [] if isinstance(d, str)]
            if self.instrument_of(form) is not None or not derived:
                return form, form
            try:
                source = self.questionnaire(repo, derived[0])
            except Unprocessable:
                return form, form  # derived from a form this server does not have: not scored
            if self.instrument_of(source) is None:
                return form, form
            _check_defined(form, source, derived[0], "QuestionnaireResponse.questionnaire")
            return form, source
        contained = next(
            (
                c
                for c in response.get("contained") or []
                if isinstance(c, dict)
                and c.get("resourceType") == "Questionnaire"
                and f"#{c.get('id')}" == reference
            ),
            None,
        )
        expression = ["QuestionnaireResponse.questionnaire"]
        if contained is None:
            raise Unprocessable(
                f"questionnaire {reference} names no contained Questionnaire",
                code="not-found",
                expression=expression,
            )
        derived = [d for d in contained.get("derivedFrom") or [] if isinstance(d, str)]
        if not derived:
            raise Unprocessable(
                "a contained Questionnaire must name the Questionnaire it derives from (derivedFrom)",
                code="required",
                expression=expression,
            )
        canonical = self.questionnaire(repo, derived[0])
        _check_defined(contained, canonical, derived[0], "QuestionnaireResponse.contained")
        return contained, canonical

    def instrument_of(self, questionnaire: JsonDict) -> Instrument | None:
        return self.registry.for_questionnaire(str(questionnaire.get("url")), questionnaire.get("version"))

    def record(self, repo: Repository, response: JsonDict) -> PatientRecord:
        """The patient's record for ``response``, read once per write and transaction (the checks before
        storage and the scoring plan before commit share it)."""
        key = ("intake", str(response.get("id") or ""), str(response.get("questionnaire")))
        cached = repo.memo.get(key)
        if isinstance(cached, PatientRecord):
            return cached
        server = repo.as_server()
        form, questionnaire = self.forms(server, response)
        instrument = self.instrument_of(questionnaire)
        episode = self.adaptive.episode(server, response)
        patient = (response.get("subject") or {}).get("reference")

        def read_administrations() -> Sequence[Administration]:
            if (
                instrument is None
                or not isinstance(instrument.mapping, InstrumentMapping)
                or not isinstance(patient, str)
                or reference_id(patient, "Patient") is None
            ):
                return ()
            exclude = str(response.get("id") or "") or None
            return self.adaptive.history(
                server, patient, instrument.mapping, episode, exclude_response=exclude
            )

        record = PatientRecord(form, questionnaire, instrument, episode, read_administrations)
        repo.memo[key] = record
        return record

    # ------------------------------------------------------------------ StorageHook
    def existing(self, repo: Repository, body: JsonDict) -> StoredResource | None:
        identifiers = body.get("identifier")
        if isinstance(identifiers, dict):  # R4 QuestionnaireResponse.identifier is 0..1
            identifiers = [identifiers]
        for ident in identifiers or []:
            if not isinstance(ident, dict) or not ident.get("system") or not ident.get("value"):
                continue
            token = f"{ident['system']}|{ident['value']}"
            repo.serialize(f"create:QuestionnaireResponse?identifier={token}")
            where = Where("QuestionnaireResponse", tokens={"identifier": (ident["system"], ident["value"])})
            found = repo.find(where, 2, interaction="create")
            if not found:
                continue
            stored = found[0]
            if _comparable(loads(stored.body_text)) == _comparable(body):
                return stored
            raise Conflict(
                f"QuestionnaireResponse/{stored.res_id} already has identifier {token} with other "
                "content; to change it, update that resource (status 'amended')",
                expression="QuestionnaireResponse.identifier",
            )
        return None

    def before_storage(
        self, repo: Repository, res_id: str, body: JsonDict, previous: StoredResource | None
    ) -> None:
        self.check(repo, {**body, "id": res_id}, previous)

    def check(self, repo: Repository, body: JsonDict, previous: StoredResource | None) -> None:
        """Intake validation of a response (422 with every problem); see the module doc."""
        issues: list[Issue] = []
        record = self.record(repo, body)
        subject = (body.get("subject") or {}).get("reference")
        patient_id = reference_id(subject, "Patient")
        if patient_id is None:
            issues.append(
                Issue(
                    "subject must reference a Patient on this server (Patient/<id>)",
                    code="required" if subject is None else "value",
                    expression=("QuestionnaireResponse.subject",),
                )
            )
        elif repo.as_server().get("Patient", patient_id) is None:
            issues.append(
                Issue(
                    f"subject Patient/{patient_id} is not known to this server",
                    code="not-found",
                    expression=("QuestionnaireResponse.subject",),
                )
            )
        if previous is not None and not previous.deleted:
            issues += _transition_problems(loads(previous.body_text), body)
        mapping = record.instrument.mapping if record.instrument is not None else None
        if isinstance(mapping, InstrumentMapping):
            answers = validate_response(body, record.form, mapping=mapping)
            if answers and patient_id is not None and not issues:
                # The adaptive plan may excuse what the plain form refuses.
                answers = self._adaptive_check(repo, body, record, mapping)
            issues += answers
        else:
            issues += validate_response(body, record.form)
        if issues:
            raise Unprocessable(issues[0].diagnostics, issues=issues)

    def _adaptive_check(
        self, repo: Repository, body: JsonDict, record: PatientRecord, mapping: InstrumentMapping
    ) -> list[Issue]:
        """Validation with the patient's adaptive plan: the groups of scales asked in full whatever the
        trigger are enabled, and the items of scales not asked in full are not required."""
        state = self.adaptive.state_from(
            repo.as_server(),
            str(body["subject"]["reference"]),
            mapping,
            record.administrations,
            episode=record.episode,
            context=context_of(body),
            # Without authored the answers are being received now: after every stored administration.
            before=body.get("authored") or None,
        )
        plan = state.plan
        asked = set(plan.in_full(trigger_scores(answers_from_response(body), mapping)))
        closed = frozenset(s.code for s in mapping.scales if s.code not in asked)
        tailored = tailored_questionnaire(record.form, plan, drop_closed=False)
        return validate_response(body, tailored, mapping=mapping, closed_scales=closed)

    def before_commit(
        self, repo: Repository, outcome: WriteOutcome, previous: StoredResource | None
    ) -> list[Issue]:
        server = repo.as_server()
        body = outcome.body
        if body is None:  # deleted: withdraw what was derived from it
            assert previous is not None
            self.apply(
                server, self.withdrawal(server, loads(previous.body_text), reason="the response was deleted")
            )
            return []
        before = loads(previous.body_text) if previous is not None and not previous.deleted else None
        status = body.get("status")
        if status in _SCORED:
            if before is not None and before.get("status") in _SCORED and _same_answers(before, body):
                return []  # the same answers again: the stored scores stand
            # One scoring run per patient at a time: the history and the active alerts read next must
            # include a concurrent run's writes, or two runs could both raise the same alert.
            server.serialize(f"scoring:{(body.get('subject') or {}).get('reference')}")
            self.record(server, body).read_again_after_lock()
            # A response stored before (even if deleted since) may have derived resources already.
            plan = self.plan(server, body, rescore=previous is not None)
        elif status == "entered-in-error" and before is not None:
            plan = self.withdrawal(server, body, reason="the response was marked entered-in-error")
        elif status in ("in-progress", "stopped"):
            return [
                Issue(
                    f"not scored: the response is {status}; it is scored once its status is completed",
                    code="incomplete",
                    severity="warning",
                    expression=("QuestionnaireResponse.status",),
                )
            ]
        else:
            return []
        self.apply(server, plan)
        return plan.warnings

    # ------------------------------------------------------------------ planning
    def plan(self, repo: Repository, response: JsonDict, *, rescore: bool) -> ScoringPlan:
        """What scoring ``response`` (stored, or not when ``$extract`` asks) would write.

        ``rescore``: the response was stored before, so its derived resources may exist already.
        """
        server = repo.as_server()
        record = self.record(server, response)
        instrument = record.instrument
        if instrument is None:
            form = record.questionnaire
            reason = f"no scoring mapping for {form.get('url')}|{form.get('version')}"
            return ScoringPlan(
                warnings=[Issue(f"not scored: {reason}", code="not-supported", severity="warning")]
            )
        res_id = str(response.get("id") or "")
        patient_ref = str(response["subject"]["reference"])
        authored, dated = self._administered(server, response, rescore=rescore)
        # Alerts follow the newest administration: a response answered before another one already
        # stored (sent late, or amended later) is scored but leaves the alerts as they stand.
        if isinstance(instrument.mapping, InstrumentMapping):
            history, later = _adaptive_history(record.administrations, authored)
        else:
            history, later = self._history(server, patient_ref, instrument, res_id, authored)
        context = context_of(response) or ("intake" if not history else "weekly")
        active = self._active_alerts(server, patient_ref)
        plan = assemble_plan(
            response,
            record.questionnaire,
            instrument,
            history=history,
            active=active,
            alerts=not later,
            current=(lambda t, i: server.get(t, i)) if rescore else (lambda t, i: None),
            stale=(lambda keep: self._withdraw_stale(server, res_id, keep)) if rescore else (lambda keep: []),
            owner=lambda: self._owner(server, patient_ref),
            context=context,
            episode=record.episode,
            administered=authored,
        )
        if dated is not None and plan.scored is not None:
            plan.warnings.insert(0, dated)
        return plan

    def _administered(
        self, repo: Repository, response: JsonDict, *, rescore: bool
    ) -> tuple[str, Issue | None]:
        """When the answers were given (module doc, 5), and the warning that says how it was chosen when
        the response has no ``authored``."""
        authored = response.get("authored")
        if isinstance(authored, str) and authored:
            return authored, None
        earlier = None
        if rescore and response.get("id"):
            panel = repo.get("Observation", derived_id(str(response["id"]), "panel"))
            body = loads(panel.body_text) if panel is not None and not panel.deleted else {}
            if body.get("status") in ("final", "amended"):
                earlier = body.get("effectiveDateTime")
        if isinstance(earlier, str):
            when, how = earlier, "the time its earlier scores carry"
        else:
            received = (response.get("meta") or {}).get("lastUpdated")
            when = received if isinstance(received, str) else instant(now_ms())
            how = "when the server received the answers (meta.lastUpdated)"
        return when, Issue(
            f"authored is absent: the scores are dated {when}, {how}; the response is stored as sent, "
            "without authored",
            code="informational",
            severity="warning",
            expression=("QuestionnaireResponse.authored",),
        )

    def withdrawal(self, repo: Repository, response: JsonDict, *, reason: str) -> ScoringPlan:
        """Mark everything derived from ``response`` entered-in-error, with its alert Flags."""
        res_id = str(response.get("id"))
        plan = ScoringPlan()
        plan.writes += self._withdraw_stale(repo, res_id, set())
        if not plan.writes:
            return plan
        withdrawn = {f"{w.res_type}/{w.res_id}" for w in plan.writes}
        withdrawn.add(f"QuestionnaireResponse/{res_id}")
        patient_ref = str((response.get("subject") or {}).get("reference"))
        for _alert, stored in self._active_alerts(repo, patient_ref):
            flag = loads(stored.body_text)
            evidence = {
                _strip_version(str((e.get("valueReference") or {}).get("reference")))
                for e in flag.get("extension", [])
                if e.get("url") == FLAG_DETAIL
            }
            if evidence & withdrawn:
                flag["status"] = "entered-in-error"
                plan.writes.append(PlannedWrite("Flag", stored.res_id, flag, stored))
        version = (response.get("meta") or {}).get("versionId")
        ref = f"QuestionnaireResponse/{res_id}" + (f"/_history/{version}" if version else "")
        plan.provenance = _provenance(
            plan.writes, ref, None, None, instant(now_ms()), "DELETE", reason=reason
        )
        return plan

    def apply(self, repo: Repository, plan: ScoringPlan) -> None:
        """Store a plan through the repository's derived writes: the resources first, then the Provenance
        naming the versions written (in the same batch when every write is new)."""
        if not plan.writes:
            return
        items = [Derived(w.res_type, w.res_id, w.body, w.previous) for w in plan.writes]
        if all(w.previous is None for w in plan.writes) and plan.provenance is not None:
            # Only new resources (version 1 each): the Provenance joins the same batch.
            prov = dict(plan.provenance)
            prov["target"] = [{"reference": f"{w.res_type}/{w.res_id}/_history/1"} for w in plan.writes]
            repo.save_derived([*items, Derived("Provenance", prov["id"], prov)])
            return
        stored = repo.save_derived(items)
        if plan.provenance is not None:
            prov = dict(plan.provenance)
            prov["target"] = [
                {"reference": f"{w.res_type}/{w.res_id}/_history/{s.version}"}
                for w, s in zip(plan.writes, stored, strict=True)
            ]
            repo.save_derived([Derived("Provenance", prov["id"], prov)])

    # ------------------------------------------------------------------ reads
    def _history(
        self,
        repo: Repository,
        patient_ref: str,
        instrument: Instrument,
        response_id: str,
        authored: str,
    ) -> tuple[list[PriorAdministration], bool]:
        """For a sum-score instrument (no change statistics): no history, and whether a later
        administration of it exists (alerts follow the newest administration).

        One index lookup by subject, filtered here: a query that also filtered by code and status in
        SQL depends on fresh planner statistics (on a PostgreSQL without autovacuum it was planned as
        nested loops over every index row of the type), while this one is a single range scan.
        """
        mapping = instrument.mapping
        assert not isinstance(mapping, InstrumentMapping)
        code = mapping.total.code
        total = (LOINC, code) if isinstance(code, str) else (code.get("system"), str(code.get("code")))
        found = repo.find(Where("Observation", references={"subject": patient_ref}), _HISTORY_LIMIT)
        current = moment(authored)
        for stored in found:
            obs = orjson.loads(stored.body_text or "{}")
            coding = ((obs.get("code") or {}).get("coding") or [{}])[0]
            if (
                obs.get("status") not in ("final", "amended")
                or (coding.get("system"), coding.get("code")) != total
            ):
                continue
            source = reference_id(
                ((obs.get("derivedFrom") or [{}])[0]).get("reference"), "QuestionnaireResponse"
            )
            when = obs.get("effectiveDateTime")
            if source is not None and source != response_id and when and moment(when) > current:
                return [], True
        return [], False

    def _active_alerts(self, repo: Repository, patient_ref: str) -> list[tuple[Alert, StoredResource]]:
        # R4 Flag has no ``status`` search parameter: the status is read from the body.
        out: list[tuple[Alert, StoredResource]] = []
        for stored in repo.find(Where("Flag", references={"subject": patient_ref}), _HISTORY_LIMIT):
            flag = loads(stored.body_text)
            if flag.get("status") != "active" or PROFILE_FLAG not in (flag.get("meta") or {}).get(
                "profile", []
            ):
                continue
            key = next(
                (
                    str(i.get("value"))
                    for i in flag.get("identifier", [])
                    if i.get("system") == ALERT_KEY_SYSTEM
                ),
                None,
            )
            if key is None:
                continue
            code, _, scale = key.partition("/")
            urgent = any(
                c.get("code") == "PH"
                for e in flag.get("extension", [])
                if e.get("url") == FLAG_PRIORITY
                for c in (e.get("valueCodeableConcept") or {}).get("coding", [])
            )
            alert = Alert(
                cast(AlertCode, code), scale or None, urgent, str((flag.get("code") or {}).get("text", ""))
            )
            out.append((alert, stored))
        out.sort(key=lambda pair: pair[1].last_updated)
        return out

    def _owner(self, repo: Repository, patient_ref: str) -> JsonDict | None:
        """The responsible clinician: the care manager of the patient's active EpisodeOfCare, else
        the patient's first general practitioner, else nobody (the Task waits in the unit's queue)."""
        where = Where("EpisodeOfCare", references={"patient": patient_ref}, tokens={"status": "active"})
        for stored in repo.find(where, 10):
            manager = loads(stored.body_text).get("careManager")
            if isinstance(manager, dict) and manager.get("reference"):
                return {"reference": manager["reference"]}
        patient_id = reference_id(patient_ref, "Patient")
        patient = repo.get("Patient", patient_id) if patient_id else None
        if patient is not None:
            gps = loads(patient.body_text).get("generalPractitioner") or []
            if gps and isinstance(gps[0], dict) and gps[0].get("reference"):
                return {"reference": gps[0]["reference"]}
        return None

    def _withdraw_stale(self, repo: Repository, response_id: str, keep: set[str]) -> list[PlannedWrite]:
        """Earlier derived resources of the response that are not in ``keep`` -> entered-in-error."""
        out: list[PlannedWrite] = []
        panel = repo.get("Observation", derived_id(response_id, "panel"))
        if panel is None:
            return out
        panel_body = loads(panel.body_text)
        refs = [m.get("reference") for m in panel_body.get("hasMember", [])]
        candidates = [("Observation", reference_id(r, "Observation")) for r in refs]
        candidates += [("Observation", panel.res_id), ("DiagnosticReport", derived_id(response_id, "report"))]
        for res_type, rid in candidates:
            if rid is None or rid in keep:
                continue
            stored = repo.get(res_type, rid)
            if stored is None:
                continue
            body = loads(stored.body_text)
            if body.get("status") == "entered-in-error":
                continue
            body["status"] = "entered-in-error"
            out.append(PlannedWrite(res_type, rid, body, stored))
        return out


def _adaptive_history(
    administrations: Sequence[Administration], authored: str
) -> tuple[list[PriorAdministration], bool]:
    """The earlier administrations of the episode (scale and alliance scores), oldest first, and
    whether a later one exists."""
    current = moment(authored)
    earlier = [a for a in administrations if moment(a.authored) < current]
    later = any(moment(a.authored) > current for a in administrations)
    history = [
        PriorAdministration(
            f"QuestionnaireResponse/{a.response}", a.authored, a.scales, a.alliance, a.measured
        )
        for a in earlier
        if a.scales or a.alliance
    ]
    return history, later


def assemble_plan(
    response: JsonDict,
    questionnaire: JsonDict,
    instrument: Instrument,
    *,
    history: Sequence[PriorAdministration] = (),
    active: Sequence[tuple[Alert, StoredResource]] = (),
    current: Callable[[str, str], StoredResource | None] = lambda t, i: None,
    stale: Callable[[set[str]], list[PlannedWrite]] = lambda keep: [],
    owner: Callable[[], JsonDict | None] = lambda: None,
    alerts: bool = True,
    context: str | None = None,
    episode: str | None = None,
    administered: str | None = None,
) -> ScoringPlan:
    """Score ``response`` and lay out every write (pure, given its inputs; used by the server, by
    ``$extract`` and by ``fhir-norse score``). ``current`` finds an earlier version of a derived
    resource, ``stale`` lists earlier derived resources to withdraw, ``owner`` the Task's owner;
    ``administered`` is when the answers were given (default ``authored``)."""
    plan = ScoringPlan()
    res_id = str(response.get("id") or new_id())
    version = (response.get("meta") or {}).get("versionId") or "1"
    response_ref = f"QuestionnaireResponse/{res_id}/_history/{version}"
    patient_ref = str(response["subject"]["reference"])
    now = instant(now_ms())
    authored = administered or str(response.get("authored") or now)
    try:
        scored = score_administration(
            response,
            instrument,
            response_ref=response_ref,
            patient_ref=patient_ref,
            history=history,
            active_alerts=[a for a, _ in active],
            id_for=lambda key: derived_id(res_id, key),
            issued=now,
            authored=authored,
        )
    except ValueError as error:
        plan.warnings.append(Issue(f"not scored: {error}", code="incomplete", severity="warning"))
        return plan
    plan.scored = scored
    plan.warnings += [Issue(w, code="business-rule", severity="warning") for w in scored.warnings]

    built = scored.resources.resources()
    stamps = _administration_extensions(response, context, episode)
    for resource in built:
        if stamps:
            resource["extension"] = [*resource.get("extension", []), *copy.deepcopy(stamps)]
        stored = current(resource["resourceType"], resource["id"])
        if stored is not None and not stored.deleted:
            resource["status"] = "amended"
        plan.writes.append(PlannedWrite(resource["resourceType"], resource["id"], resource, stored))
    plan.writes += stale({r["id"] for r in built})

    evidence = _evidence(scored, response_ref)
    by_key = {a.key: flag for a, flag in active}
    decision = scored.alerts if alerts else AlertDecision((), tuple(a for a, _ in active), ())
    for alert in decision.raise_:
        flag = _flag(alert, patient_ref, authored, evidence(alert), instrument.alert_display(alert.code))
        plan.writes.append(PlannedWrite("Flag", flag["id"], flag))
        if alert.urgent or alert.review:
            task = _task(alert, flag, patient_ref, now, owner())
            plan.writes.append(PlannedWrite("Task", task["id"], task))
    for alert in decision.resolve:
        stored_flag = by_key.get(alert.key)
        if stored_flag is None:
            continue
        flag = loads(stored_flag.body_text)
        flag["status"] = "inactive"
        flag.setdefault("period", {})["end"] = authored
        plan.writes.append(PlannedWrite("Flag", stored_flag.res_id, flag, stored_flag))
    amended = any(w.previous is not None and w.res_type != "Flag" for w in plan.writes)
    plan.provenance = _provenance(
        plan.writes, response_ref, questionnaire, instrument, now, "UPDATE" if amended else "CREATE"
    )
    return plan


# --- building alert and provenance resources -----------------------------------------------------------


_DEFINING = ("type", "code", "answerValueSet", "answerOption", "repeats", "readOnly", "maxLength")


def _check_defined(form: JsonDict, source: JsonDict, canonical: str, expression: str) -> None:
    """A derived form asks only items of its source, each defined as the source defines it (422)."""
    defined = {str(i.get("linkId")): i for i in flat_items(source)}
    issues = []
    for item in flat_items(form):
        if item.get("type") in ("group", "display"):
            continue
        base = defined.get(str(item.get("linkId")))
        if base is None or any(item.get(k) != base.get(k) for k in _DEFINING):
            issues.append(
                Issue(
                    f"item {item.get('linkId')!r} of the form is not defined so in {canonical}",
                    code="structure",
                    expression=(expression,),
                )
            )
    if issues:
        raise Unprocessable(issues[0].diagnostics, issues=issues)


def _administration_extensions(
    response: JsonDict, context: str | None, episode: str | None
) -> list[JsonDict]:
    """The administration context and the episode the derived resources carry (the response's own
    extensions when it has them, else what the server resolved)."""
    out: list[JsonDict] = []
    code = context_of(response) or context
    if code is not None:
        out.append(context_extension(code))
    ref = episode_of(response) or episode
    if ref is not None:
        out.append(episode_extension(ref))
    return out


def _strip_version(reference: str) -> str:
    return reference.split("/_history/", 1)[0]


def _transition_problems(before: JsonDict, after: JsonDict) -> list[Issue]:
    issues: list[Issue] = []
    if before.get("status") in _SCORED and after.get("status") in ("in-progress", "stopped"):
        issues.append(
            Issue(
                f"A {before.get('status')} response cannot become {after.get('status')}; "
                "amend it (status 'amended') or mark it entered-in-error",
                code="business-rule",
                expression=("QuestionnaireResponse.status",),
            )
        )
    if before.get("status") in _SCORED:
        for element in ("subject", "questionnaire"):
            if before.get(element) != after.get(element):
                issues.append(
                    Issue(
                        f"An amendment cannot change {element}; mark this response entered-in-error "
                        "and submit a new one",
                        code="business-rule",
                        expression=(f"QuestionnaireResponse.{element}",),
                    )
                )
    return issues


def _evidence(scored: ScoredAdministration, response_ref: str) -> Any:
    """alert -> the reference that shows why it was raised (the scale, the alliance total or the
    response itself)."""
    by_key: dict[str, str] = {}
    res = scored.resources
    for obs in [*res.scale_scores, *res.sum_scores]:
        coding = obs["code"]["coding"][0]
        by_key[str(coding["code"])] = f"Observation/{obs['id']}"
    for obs in res.alliance:
        by_key[f"alliance:{obs['code']['coding'][0]['code']}"] = f"Observation/{obs['id']}"
    instrument = scored.instrument.mapping
    total_code = instrument.alliance.total if isinstance(instrument, InstrumentMapping) else None
    sum_obs = res.sum_scores[0]["id"] if res.sum_scores else None

    def evidence(alert: Alert) -> str:
        if alert.code == "alliance-rupture" and total_code is not None:
            return by_key.get(f"alliance:{total_code}", response_ref)
        if alert.code == "prefer-not-suicide":
            return response_ref
        if alert.scale is not None and alert.scale in by_key:
            return by_key[alert.scale]
        if sum_obs is not None and alert.scale == scored.instrument.code:
            return f"Observation/{sum_obs}"
        return response_ref

    return evidence


def _alert_key(alert: Alert) -> str:
    return alert.code if alert.scale is None else f"{alert.code}/{alert.scale}"


def _flag(alert: Alert, patient_ref: str, authored: str, evidence: str, display: str | None) -> JsonDict:
    """The Flag of ``alert``; ``display`` is the alert code's display in the content's ``rom-alerts``."""
    coding: JsonDict = {"system": CS_ALERTS, "code": alert.code}
    if display is not None:
        coding["display"] = display
    extension: list[JsonDict] = [{"url": FLAG_DETAIL, "valueReference": {"reference": evidence}}]
    priority = ("PH", "High priority") if alert.urgent else ("PM", "Medium priority")
    extension.append(
        {
            "url": FLAG_PRIORITY,
            "valueCodeableConcept": {
                "coding": [{"system": FLAG_PRIORITY_CS, "code": priority[0], "display": priority[1]}]
            },
        }
    )
    return {
        "resourceType": "Flag",
        "id": new_id(),
        "meta": {"profile": [PROFILE_FLAG]},
        "extension": extension,
        "identifier": [{"system": ALERT_KEY_SYSTEM, "value": _alert_key(alert)}],
        "status": "active",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/flag-category",
                        "code": "clinical",
                        "display": "Clinical",
                    }
                ]
            }
        ],
        "code": {
            "coding": [coding],
            "text": alert.reason,
        },
        "subject": {"reference": patient_ref},
        "period": {"start": authored},
    }


def _task(alert: Alert, flag: JsonDict, patient_ref: str, now: str, owner: JsonDict | None) -> JsonDict:
    """The clinician's Task to review ``alert`` of ``flag`` (named as the Flag's code shows it): urgent
    for an urgent alert, routine for one that asks for a review (not on track, issue 19)."""
    name = str(flag["code"]["coding"][0].get("display") or alert.code)
    task: JsonDict = {
        "resourceType": "Task",
        "id": new_id(),
        "status": "requested",
        "intent": "order",
        "priority": "urgent" if alert.urgent else "routine",
        # Coded, so an EHR finds the alert reviews with the R4 parameter Task?code=<rom-codes>|alert-review.
        "code": {
            "coding": [{"system": CS_ROM, "code": ALERT_REVIEW, "display": "Review a clinical alert"}],
            "text": f"Review alert: {name}",
        },
        "description": f"{name}: {alert.reason}. Review before the next session.",
        "focus": {"reference": f"Flag/{flag['id']}"},
        "for": {"reference": patient_ref},
        "authoredOn": now,
        "reasonReference": dict(flag["extension"][0]["valueReference"]),
    }
    if owner is not None:
        task["owner"] = owner
    return task


def _provenance(
    writes: Sequence[PlannedWrite],
    response_ref: str,
    questionnaire: JsonDict | None,
    instrument: Instrument | None,
    now: str,
    activity: str,
    *,
    reason: str | None = None,
) -> JsonDict:
    entity: list[JsonDict] = [{"role": "source", "what": {"reference": response_ref}}]
    if questionnaire is not None:
        entity.append(
            {
                "role": "source",
                "what": {
                    "reference": f"Questionnaire/{questionnaire.get('id')}",
                    "display": f"{questionnaire.get('url')}|{questionnaire.get('version')}",
                },
            }
        )
    if instrument is not None:
        entity.append(
            {
                "role": "source",
                "what": {
                    "identifier": {
                        "system": MAPPING_SYSTEM,
                        "value": f"{instrument.code}|{instrument.version}",
                    },
                    "display": f"mappings/{instrument.path.name}",
                },
            }
        )
    prov: JsonDict = {
        "resourceType": "Provenance",
        "id": new_id(),
        "target": [{"reference": f"{w.res_type}/{w.res_id}"} for w in writes],
        "recorded": now,
        "activity": {"coding": [{"system": DATA_OPERATION, "code": activity}]},
        "agent": [
            {
                "type": {
                    "coding": [{"system": PARTICIPANT_TYPE, "code": "assembler", "display": "Assembler"}]
                },
                "who": {
                    "identifier": {"system": SOFTWARE_SYSTEM, "value": f"fhir-norse-scorer/{__version__}"},
                    "display": f"fhir-norse scoring engine {__version__}",
                },
            }
        ],
        "entity": entity,
    }
    if reason is not None:
        prov["reason"] = [{"text": reason}]
    return prov
