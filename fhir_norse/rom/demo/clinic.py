"""The demo clinic: a small outpatient unit loaded through the FHIR service, for a newcomer to look at.

What it loads (the data: ``clinic.yaml`` and ``case-studies.yaml`` beside this module):

* an Organization, the clinician Kari Berg (Practitioner with an HPR number, system
  ``urn:oid:2.16.578.1.12.4.1.4.4``) and a second clinician in no team;
* five patients (Patient with a synthetic national identity number, ``urn:oid:2.16.578.1.12.4.1.4.1``):
  Sonja and Harald from the case study and three synthetic ones (improving, not improving,
  deteriorating), each with an EpisodeOfCare (care manager: Kari Berg) and a CareTeam (participant:
  Kari Berg), so that her ``user/`` access reaches them
  (:meth:`fhir_norse.auth.policy.AccessPolicy.reachable`);
* their feedback reports as completed QuestionnaireResponses to the static NF 2.1 form, in order, each
  ``authored`` on its day of the story at 08:30 in the clinic's time zone, the last a few days before the
  first load. The server scores each as it stores it, as it would a patient's own: the Observations,
  DiagnosticReports, Flags and alert-review Tasks are the scoring's, not the demo's;
* an open questionnaire Task a patient has not answered for days (``open_questionnaires``).

Every write is an interaction of the local operator through :class:`FhirService` (validated, indexed and
audited like any other), in its own transaction. The demo is idempotent: resources are created
conditionally on their identifiers (``If-None-Exist``, https://hl7.org/fhir/R4/http.html#ccreate) and each
response carries an identifier, which the intake answers with the stored response when the content is the
same. The story's dates are fixed at the first load (the CareTeam's ``period.start``), so a second load
sends the same responses and changes nothing; an interrupted load is finished by the next. Every resource
the demo writes carries the security label HTEST ("test health data",
https://terminology.hl7.org/CodeSystem-v3-ActReason.html), so no one mistakes it for a real person's.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from fhir_norse.auth.caller import Caller
from fhir_norse.canonicals import BASE
from fhir_norse.instruments.schema import InstrumentMapping
from fhir_norse.outcomes import FhirError
from fhir_norse.rom.administrations import OPEN_STATUSES, questionnaire_task
from fhir_norse.rom.demo.scenarios import Scenario, answers_for, case_studies, data_file, load_scenarios
from fhir_norse.rom.intake import QuestionnaireResponseIntake
from fhir_norse.rom.patient import episode_extension
from fhir_norse.server.context import RequestContext, Result
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.repository import JsonDict, Repository, loads
from fhir_norse.server.search.typed import Where

__all__ = [
    "DEMO_IDENTIFIER_SYSTEM",
    "HPR_SYSTEM",
    "NATIONAL_ID_SYSTEM",
    "DemoClinician",
    "DemoError",
    "DemoPatient",
    "DemoResult",
    "load_demo",
    "site_root",
]

# The identifier system of the demo's own things (organization, care teams, episodes, Tasks).
DEMO_IDENTIFIER_SYSTEM = f"{BASE}/demo"
# Norwegian national identity numbers (fødselsnummer) and the health personnel register (HPR).
NATIONAL_ID_SYSTEM = "urn:oid:2.16.578.1.12.4.1.4.1"
HPR_SYSTEM = "urn:oid:2.16.578.1.12.4.1.4.4"
# "Test health data": https://terminology.hl7.org/CodeSystem-v3-ActReason.html#v3-ActReason-HTEST
TEST_DATA_LABEL: JsonDict = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
    "code": "HTEST",
    "display": "test health data",
}
# A QuestionnaireResponse.identifier is a URI (the case-study test uses the same system).
RESPONSE_IDENTIFIER_SYSTEM = "urn:ietf:rfc:3986"
# The time of day the demo's patients answer (before a morning session), in the clinic's time zone.
ANSWERED_AT = time(8, 30)
# The files of the clinic (organization, clinicians, synthetic patients, Tasks) and of the case study.
CLINIC_FILE = "clinic.yaml"
# More resources of one type than a patient of the demo has (the counts read back for the summary).
_LIMIT = 1000


class DemoError(Exception):
    """The demo cannot be loaded on this server (what to do is in the message); nothing was written."""


@dataclass(frozen=True)
class DemoPatient:
    """One demo patient as loaded: ``reports`` responses (the last ``last_authored``), ``alerts`` active
    Flags and ``open_tasks`` open Tasks for the patient."""

    key: str
    name: str
    patient_id: str
    reports: int
    last_authored: str
    alerts: int
    open_tasks: int


@dataclass(frozen=True)
class DemoClinician:
    """One demo clinician: ``care_manager`` is the one who treats every demo patient."""

    key: str
    name: str
    practitioner_id: str
    hpr: str
    care_manager: bool


@dataclass
class DemoResult:
    """What :func:`load_demo` did: resources it created and found unchanged, by type (the scoring's own
    writes not counted), the patients, the clinicians and the Organization's id."""

    created: Counter[str] = field(default_factory=Counter)
    unchanged: Counter[str] = field(default_factory=Counter)
    patients: list[DemoPatient] = field(default_factory=list)
    clinicians: list[DemoClinician] = field(default_factory=list)
    organization: str = ""
    cohort: str = ""  # the Group of the clinic's patients in treatment

    @property
    def changed(self) -> bool:
        """Whether the load wrote anything (False: the demo clinic was already complete)."""
        return any(self.created.values())

    def patient(self, key: str) -> DemoPatient:
        """The demo patient ``key`` (sonja, harald, mia, per, eva)."""
        for patient in self.patients:
            if patient.key == key:
                return patient
        raise KeyError(key)

    def clinician(self, key: str) -> DemoClinician:
        """The demo clinician ``key`` (kari, jonas)."""
        for clinician in self.clinicians:
            if clinician.key == key:
                return clinician
        raise KeyError(key)

    def describe(self, site: str) -> list[str]:
        """What was loaded and the pages a newcomer opens at ``site`` (the server's root URL, without
        ``/fhir``), as lines to print. No national identity number is shown."""
        if self.changed:
            made = ", ".join(f"{n} {t}" for t, n in sorted(self.created.items()) if n)
            lines = [f"Demo clinic loaded: {made} created (the server scored each response as it stored it)."]
        else:
            found = sum(self.unchanged.values())
            lines = [
                f"The demo clinic is already loaded: nothing changed ({found} resources found as they were)."
            ]
        for clinician in self.clinicians:
            role = "treats every demo patient" if clinician.care_manager else "in no care team"
            lines.append(
                f"  {clinician.name}: Practitioner/{clinician.practitioner_id} (HPR {clinician.hpr}), {role}"
            )
        width = max((len(p.name) for p in self.patients), default=0)
        for patient in self.patients:
            extra = [_count(patient.alerts, "active alert"), _count(patient.open_tasks, "open Task")]
            notes = "".join(f", {e}" for e in extra if e)
            last = patient.last_authored[:10]
            lines.append(
                f"  {patient.name:<{width}}  Patient/{patient.patient_id}: {patient.reports} reports "
                f"(last {last}){notes}"
            )
        if self.cohort:
            lines.append(
                f"  cohort: Group/{self.cohort} (Bulk Data: {site}/fhir/Group/{self.cohort}/$export)"
            )
        lines.append("Open in a browser:")
        lines.append(f"  caseload: {site}/caseload")
        for key in ("sonja", "harald"):
            patient = self.patient(key)
            lines.append(f"  {patient.name}: {site}/report/Patient/{patient.patient_id}")
        return lines


def load_demo(
    service: FhirService,
    *,
    base_url: str,
    timezone: str = "Europe/Oslo",
    now: datetime | None = None,
) -> DemoResult:
    """Load the demo clinic (module doc) into ``service`` as the local operator; ``base_url`` is the FHIR
    base of the audit trail and the answers, ``timezone`` the clinic's, ``now`` the moment the story ends
    relative to (default: now). DemoError when the server cannot score the demo's form (checked before
    anything is written); a FhirError of an interaction that fails is raised as it is."""
    return _Loader(service, base_url, ZoneInfo(timezone), now or datetime.now(UTC)).load()


class _Loader:
    def __init__(self, service: FhirService, base_url: str, zone: ZoneInfo, now: datetime) -> None:
        self.service = service
        self.ctx = RequestContext(caller=Caller.operator(), base_url=base_url)
        self.zone = zone
        self.now = now
        self.clinic = data_file(CLINIC_FILE)
        self.result = DemoResult()

    def load(self) -> DemoResult:
        # Everything that can refuse is checked before the first write: the forms, the data.
        forms = self.clinic["forms"]
        form, mapping = self._form(str(forms["responses"]))
        self._form(str(forms["tasks"]))
        patients = [*case_studies(), *load_scenarios(CLINIC_FILE)]
        answers = {s.key: [answers_for(report, mapping) for report in s.complete()] for s in patients}
        organization = self._organization()
        lead = str(self.clinic["care_manager"])
        for key, person in self.clinic["clinicians"].items():
            clinician = DemoClinician(
                key=str(key),
                name=f"{person['given']} {person['family']}",
                practitioner_id=self._practitioner(person),
                hpr=str(person["hpr"]),
                care_manager=key == lead,
            )
            self.result.clinicians.append(clinician)
        manager = self.result.clinician(lead).practitioner_id
        ids = {s.key: self._patient(s, organization, manager, form, answers[s.key]) for s in patients}
        for task in self.clinic.get("open_questionnaires") or []:
            self._open_questionnaire(task, ids[str(task["patient"])], manager, str(forms["tasks"]))
        self.result.patients = [self._summary(s, ids[s.key]) for s in patients]
        self.result.cohort = self._cohort(organization, list(ids.values()))
        return self.result

    # ------------------------------------------------------------------ prerequisites
    def _form(self, canonical: str) -> tuple[JsonDict, InstrumentMapping]:
        """The published Questionnaire ``url|version`` and the mapping the server scores it with."""
        url, _, version = canonical.partition("|")
        hook = self.service.kernel.hooks.get("QuestionnaireResponse")
        if not isinstance(hook, QuestionnaireResponseIntake):
            raise DemoError("this server does not score QuestionnaireResponses (no intake): no demo")
        with self.service.session(self.ctx, read_only=True) as repo:
            found = repo.find(Where("Questionnaire", uris={"url": url}, tokens={"version": version}), 2)
        if len(found) != 1:
            raise DemoError(
                f"Questionnaire {canonical} is not published on this server: start the server once (it "
                "publishes its content pack) or set FHIR_NORSE_PUBLISH_CONTENT=true, then load the demo"
            )
        questionnaire = loads(found[0].body_text)
        instrument = hook.instrument_of(questionnaire)
        if instrument is None or not isinstance(instrument.mapping, InstrumentMapping):
            raise DemoError(f"no Norse Feedback mapping scores Questionnaire {canonical} on this server")
        return questionnaire, instrument.mapping

    # ------------------------------------------------------------------ the clinic
    def _organization(self) -> str:
        body: JsonDict = {
            "resourceType": "Organization",
            "identifier": [_demo_identifier("organization")],
            "active": True,
            "name": str(self.clinic["organization"]["name"]),
        }
        self.result.organization = str(self._ensure(body)["id"])
        return self.result.organization

    def _practitioner(self, person: Mapping[str, Any]) -> str:
        body: JsonDict = {
            "resourceType": "Practitioner",
            "identifier": [{"use": "official", "system": HPR_SYSTEM, "value": str(person["hpr"])}],
            "active": True,
            "name": [{"use": "official", "family": str(person["family"]), "given": [str(person["given"])]}],
        }
        return str(self._ensure(body)["id"])

    def _patient(
        self,
        story: Scenario,
        organization: str,
        manager: str,
        form: JsonDict,
        answers: Sequence[Mapping[str, str]],
    ) -> str:
        """The patient, their care team and episode, and their reports (``answers``: per report 1..total,
        the answers given; module doc)."""
        patient_id = str(self._ensure(_patient_resource(story, organization))["id"])
        patient = {"reference": f"Patient/{patient_id}"}
        clinician = {"reference": f"Practitioner/{manager}"}
        unit = {"reference": f"Organization/{organization}"}
        # The first report's day: fixed by the first load (the CareTeam keeps it), relative to now.
        today = self.now.astimezone(self.zone).date()
        first = today - timedelta(days=story.ends_days_ago + story.days[-1])
        team = self._ensure(
            {
                "resourceType": "CareTeam",
                "identifier": [_demo_identifier(f"{story.key}/care-team")],
                "status": "active",
                "name": f"{story.name}: behandlerteam",
                "subject": patient,
                "period": {"start": first.isoformat()},
                "participant": [{"role": [{"text": "Behandler / therapist"}], "member": clinician}],
                "managingOrganization": [unit],
            }
        )
        first = date.fromisoformat(str(team["period"]["start"]))
        episode = self._ensure(
            {
                "resourceType": "EpisodeOfCare",
                "identifier": [_demo_identifier(f"{story.key}/episode")],
                "status": "active",
                "patient": patient,
                "managingOrganization": unit,
                "period": {"start": first.isoformat()},
                "careManager": clinician,
                "team": [{"reference": f"CareTeam/{team['id']}"}],
            }
        )
        canonical = f"{form['url']}|{form['version']}"
        for number, given in enumerate(answers, start=1):
            day = first + timedelta(days=story.days[number - 1])
            body: JsonDict = {
                "resourceType": "QuestionnaireResponse",
                "extension": [episode_extension(f"EpisodeOfCare/{episode['id']}")],
                "identifier": _response_identifier(story.key, number),
                "questionnaire": canonical,
                "status": "completed",
                "subject": patient,
                "authored": datetime.combine(day, ANSWERED_AT, tzinfo=self.zone).isoformat(),
                "author": patient,
                "item": response_items(form["item"], given),
            }
            self._write("QuestionnaireResponse", body)
        return patient_id

    def _open_questionnaire(self, spec: Mapping[str, Any], patient_id: str, manager: str, form: str) -> None:
        """An open questionnaire Task, opened ``opened_hours_ago`` before the first load (module doc)."""
        opened = self.now - timedelta(hours=float(spec["opened_hours_ago"]))
        task = questionnaire_task(
            task_id="",
            patient_id=patient_id,
            questionnaire=form,
            start=opened,
            end=opened + timedelta(hours=float(spec["window_hours"])),
            authored=opened,
            requester={"reference": f"Practitioner/{manager}"},
            context="weekly",
        )
        del task["id"]  # the server names what it creates (and would ignore an id: R4 http.html#create)
        task["identifier"] = [_demo_identifier(f"{spec['patient']}/questionnaire-task")]
        self._ensure(task)

    def _cohort(self, organization: str, patient_ids: list[str]) -> str:
        """The clinic's patients in treatment as a Group: the unit of a Bulk Data Group-level export
        (``GET [base]/Group/[id]/$export``), for a registry or a quality report."""
        body: JsonDict = {
            "resourceType": "Group",
            "identifier": [_demo_identifier("cohort-in-treatment")],
            "active": True,
            "type": "person",
            "actual": True,
            "name": f"{self.clinic['organization']['name']}: patients in treatment",
            "managingEntity": {"reference": f"Organization/{organization}"},
            "quantity": len(patient_ids),
            "member": [{"entity": {"reference": f"Patient/{pid}"}} for pid in patient_ids],
        }
        return str(self._ensure(body)["id"])

    # ------------------------------------------------------------------ writing and reading back
    def _ensure(self, body: JsonDict) -> JsonDict:
        """Create ``body`` unless a resource with its first identifier exists: the stored resource."""
        identifier = body["identifier"][0]
        query = urlencode({"identifier": f"{identifier['system']}|{identifier['value']}"})
        return self._write(str(body["resourceType"]), body, if_none_exist=query)

    def _write(self, res_type: str, body: JsonDict, *, if_none_exist: str | None = None) -> JsonDict:
        labelled = {**body, "meta": {"security": [TEST_DATA_LABEL]}}
        result = self.service.create(self.ctx, res_type, labelled, if_none_exist=if_none_exist)
        (self.result.created if result.status == 201 else self.result.unchanged)[res_type] += 1
        return _body(result)

    def _summary(self, story: Scenario, patient_id: str) -> DemoPatient:
        ref = f"Patient/{patient_id}"
        with self.service.session(self.ctx, read_only=True) as repo:
            responses = _find(repo, Where("QuestionnaireResponse", references={"subject": ref}))
            flags = _find(repo, Where("Flag", references={"subject": ref}, tokens={"status": "active"}))
            tasks = _find(repo, Where("Task", references={"patient": ref}))
        authored = sorted(str(r.get("authored")) for r in responses)
        return DemoPatient(
            key=story.key,
            name=story.name,
            patient_id=patient_id,
            reports=len(responses),
            last_authored=authored[-1] if authored else "",
            alerts=len(flags),
            open_tasks=sum(t.get("status") in OPEN_STATUSES for t in tasks),
        )


def response_items(items: Sequence[JsonDict], answers: Mapping[str, str]) -> list[JsonDict]:
    """The items of a response to a form with ``items`` answering ``answers`` (linkId -> answer code or
    value), in the form's order and groups, each choice answered with the form's own Coding (system, code
    and display, as an SDC form filler sends it)."""
    out: list[JsonDict] = []
    for item in items:
        if item.get("type") == "group":
            children = response_items(item.get("item") or [], answers)
            if children:
                out.append({"linkId": item["linkId"], "item": children})
        elif item.get("linkId") in answers:
            out.append({"linkId": item["linkId"], "answer": [_answer(item, answers[item["linkId"]])]})
    return out


def _answer(item: JsonDict, value: str) -> JsonDict:
    if item.get("type") in ("choice", "open-choice"):
        for option in item.get("answerOption") or []:
            coding = option.get("valueCoding") or {}
            if coding.get("code") == value:
                return {"valueCoding": {k: coding[k] for k in ("system", "code", "display") if k in coding}}
        raise ValueError(f"{item['linkId']}: the form has no answer {value!r}")
    if item.get("type") == "integer":
        return {"valueInteger": int(value)}
    return {"valueString": value}


def site_root(fhir_base_url: str) -> str:
    """The server's root URL (where ``/caseload`` and ``/report/...`` are) of its FHIR base URL."""
    return fhir_base_url.rstrip("/").removesuffix("/fhir")


def _count(n: int, what: str) -> str:
    return "" if n == 0 else f"1 {what}" if n == 1 else f"{n} {what}s"


def _demo_identifier(value: str) -> JsonDict:
    return {"system": DEMO_IDENTIFIER_SYSTEM, "value": value}


def _response_identifier(key: str, number: int) -> JsonDict:
    """The identifier of patient ``key``'s report ``number``: a UUID v5 of the report's name."""
    name = f"{DEMO_IDENTIFIER_SYSTEM}/{key}/{number}"
    return {"system": RESPONSE_IDENTIFIER_SYSTEM, "value": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, name)}"}


def _patient_resource(story: Scenario, organization: str) -> JsonDict:
    """The Patient of ``story``; with an e-mail address, the channel the scheduler invites them on."""
    patient: JsonDict = {
        "resourceType": "Patient",
        "identifier": [{"use": "official", "system": NATIONAL_ID_SYSTEM, "value": story.national_id}],
        "active": True,
        "name": [{"use": "official", "family": story.family, "given": [story.given]}],
    }
    if story.email:
        patient["telecom"] = [{"system": "email", "value": story.email, "use": "home"}]
    return patient | {
        "gender": story.gender,
        "birthDate": story.birth_date.isoformat(),
        "managingOrganization": {"reference": f"Organization/{organization}"},
    }


def _body(result: Result) -> JsonDict:
    body = result.body if result.body is not None else loads(result.raw or "{}")
    if not isinstance(body, dict) or "id" not in body:
        raise FhirError(f"the server answered {result.status} to the demo without the resource")
    return body


def _find(repo: Repository, where: Where) -> list[JsonDict]:
    return [loads(stored.body_text) for stored in repo.find(where, _LIMIT)]
