"""Outcome monitoring through the repository, without HTTP (issue 11): the storage hooks of
QuestionnaireResponse and ServiceRequest, the derived writes, amendment and withdrawal, and the typed
reads of a patient's record, driven the way every path drives them (SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fhir_norse.auth.caller import Caller
from fhir_norse.compose import build_service
from fhir_norse.config import Settings
from fhir_norse.instruments.schema import InstrumentMapping
from fhir_norse.outcomes import Forbidden, Unprocessable
from fhir_norse.rom.intake import QuestionnaireResponseIntake, derived_id
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.repository import Derived, Repository, loads
from fhir_norse.server.search.typed import Where
from fhir_norse.store import migrate
from tests.intake_support import NF21_STATIC, nf21_answers, publish_questionnaires, response

SCALES = "http://fhir-norse.org/fhir/CodeSystem/nf21-scales"
OPERATOR = RequestContext(caller=Caller.operator(), base_url="urn:test")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[FhirService]:
    url = f"sqlite:///{tmp_path / 'rom.sqlite3'}"
    settings = Settings(database_url=url, mode="development", publish_content=False)
    built = build_service(settings)
    migrate.upgrade(built.storage.engine)
    publish_questionnaires(built)
    yield built
    built.storage.engine.dispose()


def _patient(repo: Repository) -> str:
    return repo.create("Patient", {"resourceType": "Patient", "name": [{"family": "Nordmann"}]}).stored.res_id


def _bodies(repo: Repository, where: Where) -> list[dict[str, Any]]:
    return [loads(s.body_text) for s in repo.find(where, 1000)]


def test_a_response_created_through_the_repository_is_scored_in_the_same_transaction(
    service: FhirService,
) -> None:
    with service.session(OPERATOR) as repo:
        patient = _patient(repo)
        outcome = repo.create("QuestionnaireResponse", response(NF21_STATIC, nf21_answers(), patient=patient))
        qr = outcome.stored.res_id
        # Inside the same transaction the derived resources are there already.
        observations = _bodies(repo, Where("Observation", references={"subject": f"Patient/{patient}"}))
        assert observations and all(o["status"] == "final" for o in observations)
        report = repo.get("DiagnosticReport", derived_id(qr, "report"))
        assert report is not None
    with service.session(OPERATOR) as repo:
        scale_scores = [
            o
            for o in _bodies(repo, Where("Observation", references={"subject": f"Patient/{patient}"}))
            if o["code"]["coding"][0]["system"] == SCALES
        ]
        assert {o["code"]["coding"][0]["code"] for o in scale_scores} >= {"sad", "somAnx"}


def test_a_refused_write_leaves_nothing(service: FhirService) -> None:
    with service.session(OPERATOR) as repo:
        patient = _patient(repo)
    body = response(NF21_STATIC, nf21_answers(), patient=patient)
    body["item"][0]["item"][0]["answer"][0]["valueCoding"]["code"] = "9"  # not an answer option
    with pytest.raises(Unprocessable, match="sad-1"), service.session(OPERATOR) as repo:
        repo.create("QuestionnaireResponse", body)
    with service.session(OPERATOR) as repo:
        assert (
            repo.find(Where("QuestionnaireResponse", references={"subject": f"Patient/{patient}"}), 10) == []
        )
        assert repo.find(Where("Observation", references={"subject": f"Patient/{patient}"}), 10) == []


def test_amendment_and_withdrawal_through_the_repository(service: FhirService) -> None:
    with service.session(OPERATOR) as repo:
        patient = _patient(repo)
        qr = repo.create("QuestionnaireResponse", response(NF21_STATIC, nf21_answers(), patient=patient))
    qr_id = qr.stored.res_id
    assert qr.body is not None
    amended = {
        **qr.body,
        "status": "amended",
        "item": response(NF21_STATIC, nf21_answers({"sad": 6}), patient=patient)["item"],
    }
    with service.session(OPERATOR) as repo:
        repo.update("QuestionnaireResponse", qr_id, amended)
        report = repo.get("DiagnosticReport", derived_id(qr_id, "report"))
        assert report is not None and report.version == 2
    with service.session(OPERATOR) as repo:
        repo.delete("QuestionnaireResponse", qr_id)
        report = repo.get("DiagnosticReport", derived_id(qr_id, "report"))
        assert report is not None and loads(report.body_text)["status"] == "entered-in-error"


def test_derived_writes_are_the_servers_own(service: FhirService) -> None:
    """A caller's repository cannot write derived resources; only the server's (same transaction) can."""
    with service.session(OPERATOR) as repo, pytest.raises(Forbidden):
        repo.save_derived([Derived("Flag", "f1", {"resourceType": "Flag", "status": "active"})])


def test_the_override_hook_refuses_an_incomplete_override(service: FhirService) -> None:
    with service.session(OPERATOR) as repo:
        patient = _patient(repo)
        override = {
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://fhir-norse.org/fhir/CodeSystem/rom-codes",
                            "code": "scale-override",
                        }
                    ]
                }
            ],
            "code": {"coding": [{"system": SCALES, "code": "eating"}]},
            "subject": {"reference": f"Patient/{patient}"},
        }
        with pytest.raises(Unprocessable) as refused:
            repo.create("ServiceRequest", override)
        assert {e for i in refused.value.issues for e in i.expression} >= {
            "ServiceRequest.requester",
            "ServiceRequest.authoredOn",
            "ServiceRequest.doNotPerform",
        }


def test_the_patient_record_reads_through_the_repository(service: FhirService) -> None:
    intake = service.kernel.hooks["QuestionnaireResponse"]
    assert isinstance(intake, QuestionnaireResponseIntake)
    with service.session(OPERATOR) as repo:
        patient = _patient(repo)
        for week, level in enumerate((6, 6, 2)):
            answers = nf21_answers({"sad": level})
            body = response(
                NF21_STATIC, answers, patient=patient, authored=f"2026-03-{week + 2:02d}T09:00:00+01:00"
            )
            repo.create("QuestionnaireResponse", body)
    with service.session(OPERATOR) as repo:
        server = repo.as_server()
        instrument = intake.registry.for_questionnaire(*NF21_STATIC.split("|"))
        assert instrument is not None and isinstance(instrument.mapping, InstrumentMapping)
        history = intake.adaptive.history(server, f"Patient/{patient}", instrument.mapping, None)
        assert len(history) == 3
        assert [a.authored[:10] for a in history] == ["2026-03-02", "2026-03-03", "2026-03-04"]
        state = intake.adaptive.patient_state(
            server, f"Patient/{patient}", instrument.mapping, episode=None, context=None
        )
        assert state.context == "weekly" and state.states["sad"].open
