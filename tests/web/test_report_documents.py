"""The feedback report into the EHR (fhir_norse/web/report/documents.py): each scored administration's
PDF as DiagnosticReport.presentedForm, a Binary and a DocumentReference, rendered in the scheduler's tick.

One patient with two scored administrations is built once per module and database; the scheduler's tick
(the job app.py registers) renders both. Then, over HTTP, as an EHR (a system/*.rs token): the reports
carry presentedForm -> Binary/<id>, whose PDF (pdftotext) names the patient and the alliance total; one
DocumentReference per report with the same attachment; a second run creates nothing. A clinician outside
the care team gets 404 for the Binary and no DocumentReference; one in it gets both. An amended response
(a new report version) gets a new document that replaces the earlier one. A report that fails to
render waits out its pause and is rendered later.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.auth.caller import Caller
from fhir_norse.config import Settings
from fhir_norse.rom.report import assemble_report
from fhir_norse.server.context import RequestContext
from fhir_norse.web.report import ReportPages
from fhir_norse.web.report.documents import DOCUMENT_SYSTEM, ReportDocuments
from fhir_norse.web.report.texts import format_percent
from tests.intake_support import FHIR, NF21_STATIC, create_patient, nf21_answers, post_response, response
from tests.rom.test_report import _created, _truncate
from tests.tokens import bearer

NOW = datetime(2025, 9, 1, 12, 0, tzinfo=UTC)
PDFTOTEXT = "/usr/bin/pdftotext"


@dataclass
class Clinic:
    app: FastAPI
    patient: str
    responses: list[str]
    practitioner: str
    stranger: str
    seconds_per_report: float

    def client(self, scope: str = "system/*.rs", **context: str) -> TestClient:
        return TestClient(self.app, headers=bearer(self.app, scope, **context))

    def run(self) -> int:
        """One scheduler tick (its extra jobs included); the documents the renderer created."""
        report = self.app.state.journey.scheduler.work(NOW)
        created: int = report.jobs["report-documents"]
        return created


def _search(client: TestClient, query: str) -> list[dict[str, Any]]:
    answer = client.get(f"/fhir/{query}", headers=FHIR)
    assert answer.status_code == 200, answer.text
    return [e["resource"] for e in answer.json().get("entry", []) if e["search"]["mode"] == "match"]


def _text(pdf: bytes) -> str:
    out = subprocess.run([PDFTOTEXT, "-layout", "-", "-"], input=pdf, capture_output=True, check=True).stdout
    return " ".join(out.decode("utf-8").replace("\u00a0", " ").replace("\u202f", " ").split())


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def clinic(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clinic]:
    from tests.intake_support import publish_questionnaires

    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("documents") / "fhir.sqlite3"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        url = f"sqlite:///{path}"
    else:
        url = request.getfixturevalue("pg_schema_url")
        _truncate(url)
    settings = Settings(
        database_url=url,
        base_url="http://testserver/fhir",
        mode="development",
        publish_content=False,
        report_documents=True,
    )
    app = create_app(settings, clock=lambda: NOW)
    publish_questionnaires(app.state.service)
    try:
        with TestClient(app, headers=bearer(app)) as client:
            patient = create_patient(
                client, "Dokumentsen", name=[{"family": "Dokumentsen", "given": ["Dina"]}]
            )
            responses = []
            for when, alliance in (("2025-08-04T10:00:00+02:00", 6), ("2025-08-11T10:00:00+02:00", 4)):
                body = response(
                    NF21_STATIC, nf21_answers({"worry": 5}, alliance=alliance), patient=patient, authored=when
                )
                answer = post_response(client, body)
                assert answer.status_code == 201, answer.text
                responses.append(str(answer.json()["id"]))
            practitioner = _created(client, "Practitioner", {"resourceType": "Practitioner"})
            stranger = _created(client, "Practitioner", {"resourceType": "Practitioner"})
            _created(
                client,
                "CareTeam",
                {
                    "resourceType": "CareTeam",
                    "status": "active",
                    "subject": {"reference": f"Patient/{patient}"},
                    "participant": [{"member": {"reference": f"Practitioner/{practitioner}"}}],
                },
            )
        clinic = Clinic(app, patient, responses, practitioner, stranger, 0.0)
        started = time.perf_counter()
        assert clinic.run() == 2
        clinic.seconds_per_report = (time.perf_counter() - started) / 2
        print(f"\nrender_pending: {clinic.seconds_per_report:.2f} s per DiagnosticReport ({request.param})")
        yield clinic
    finally:
        app.state.service.storage.engine.dispose()


def test_presented_form_binary_and_document_reference(clinic: Clinic) -> None:
    with clinic.client() as ehr:
        reports = _search(ehr, f"DiagnosticReport?patient=Patient/{clinic.patient}")
        assert len(reports) == 2
        documents = _search(ehr, f"DocumentReference?patient=Patient/{clinic.patient}")
        assert len(documents) == 2
        by_report = {d["context"]["related"][0]["reference"]: d for d in documents}
        for report in reports:
            (form,) = report["presentedForm"]
            assert form["contentType"] == "application/pdf"
            assert form["url"].startswith("Binary/")
            binary = ehr.get(f"/fhir/{form['url']}", headers=FHIR)
            assert binary.status_code == 200, binary.text
            assert binary.json()["contentType"] == "application/pdf"
            assert binary.json()["securityContext"] == {"reference": f"DiagnosticReport/{report['id']}"}
            pdf = base64.b64decode(binary.json()["data"])
            assert pdf.startswith(b"%PDF-")
            assert form["size"] == len(pdf)
            assert form["hash"] == base64.b64encode(hashlib.sha1(pdf).digest()).decode("ascii")
            # The PDF is the report as of that administration: its patient and alliance total.
            ctx = RequestContext(caller=Caller.operator(), base_url="http://testserver/fhir")
            with clinic.app.state.service.session(ctx, read_only=True) as repo:
                facts = assemble_report(repo, clinic.patient, administration=report["id"])
            total = next(b for b in facts.alliance.bars if b.code == "total")
            assert total.percent is not None
            text = _text(pdf)
            assert "Dina Dokumentsen" in text
            assert format_percent(total.percent, "nb").replace("\u00a0", " ") in text
            document = by_report[f"DiagnosticReport/{report['id']}"]
            assert document["status"] == "current" and document["docStatus"] == "final"
            assert document["content"][0]["attachment"] == form
            assert document["subject"] == {"reference": f"Patient/{clinic.patient}"}
            codes = {(c["system"], c["code"]) for c in document["type"]["coding"]}
            assert ("http://loinc.org", "11506-3") in codes
            assert document["identifier"][0]["system"] == DOCUMENT_SYSTEM
        # The two administrations differ (alliance 6 then 4), so do their PDFs.
        assert len({r["presentedForm"][0]["hash"] for r in reports}) == 2
        # Found by the report it presents, too.
        related = _search(ehr, f"DocumentReference?related=DiagnosticReport/{reports[0]['id']}")
        assert [d["id"] for d in related] == [by_report[f"DiagnosticReport/{reports[0]['id']}"]["id"]]
    # A second run finds nothing to do.
    assert clinic.run() == 0


def test_a_clinician_outside_the_care_team_reaches_no_document(clinic: Clinic) -> None:
    with clinic.client() as ehr:
        report = _search(ehr, f"DiagnosticReport?patient=Patient/{clinic.patient}")[0]
    url = f"/fhir/{report['presentedForm'][0]['url']}"
    with clinic.client("user/*.rs", practitioner=clinic.stranger) as stranger:
        assert stranger.get(url, headers=FHIR).status_code == 404
        assert _search(stranger, f"DocumentReference?patient=Patient/{clinic.patient}") == []
    with clinic.client("user/*.rs", practitioner=clinic.practitioner) as member:
        assert member.get(url, headers=FHIR).status_code == 200
        assert len(_search(member, f"DocumentReference?patient=Patient/{clinic.patient}")) == 2


def test_an_amended_report_gets_a_new_document(clinic: Clinic) -> None:
    first = clinic.responses[0]
    with clinic.client("system/*.cruds") as ehr:
        stored = ehr.get(f"/fhir/QuestionnaireResponse/{first}", headers=FHIR).json()
        amended = response(
            NF21_STATIC,
            nf21_answers({"worry": 6}, alliance=5),
            patient=clinic.patient,
            authored=stored["authored"],
            status="amended",
        )
        amended["id"] = first
        answer = ehr.put(f"/fhir/QuestionnaireResponse/{first}", json=amended, headers=FHIR)
        assert answer.status_code == 200, answer.text
        before = _search(ehr, f"DocumentReference?patient=Patient/{clinic.patient}&status=current")
        assert clinic.run() == 1
        assert clinic.run() == 0
        documents = _search(ehr, f"DocumentReference?patient=Patient/{clinic.patient}")
        current = [d for d in documents if d["status"] == "current"]
        superseded = [d for d in documents if d["status"] == "superseded"]
        assert len(documents) == 3 and len(current) == 2 and len(superseded) == 1
        (new,) = [d for d in current if d["id"] not in {b["id"] for b in before}]
        assert new["docStatus"] == "amended"
        assert new["relatesTo"] == [
            {"code": "replaces", "target": {"reference": f"DocumentReference/{superseded[0]['id']}"}}
        ]
        report_ref = new["context"]["related"][0]["reference"]
        report = ehr.get(f"/fhir/{report_ref}", headers=FHIR).json()
        assert report["status"] == "amended"
        assert report["presentedForm"] == [new["content"][0]["attachment"]]


class _Broken(ReportPages):
    def report_pdf(self, report: Any, lang: Any) -> bytes:
        raise RuntimeError("no fonts today")


def test_a_failing_report_is_retried_after_a_pause(clinic: Clinic) -> None:
    with clinic.client("system/*.cruds") as ehr:
        body = response(
            NF21_STATIC,
            nf21_answers({}, alliance=6),
            patient=clinic.patient,
            authored="2025-08-18T10:00:00+02:00",
        )
        assert post_response(ehr, body).status_code == 201
    service = clinic.app.state.service
    broken = ReportDocuments(service, _Broken(), now=lambda: NOW)
    assert broken.render_pending() == 0
    # Not pending again until its pause (5 minutes after the first failure) is over.
    assert broken.pending(5, NOW + timedelta(minutes=4)) == []
    assert len(broken.pending(5, NOW + timedelta(minutes=6))) == 1
    later = ReportDocuments(service, ReportPages(), now=lambda: NOW + timedelta(minutes=6))
    assert later.render_pending() == 1
    assert later.pending(5, NOW + timedelta(minutes=6)) == []
