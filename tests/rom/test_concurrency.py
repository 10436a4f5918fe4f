"""Concurrent writers: two scoring runs for one patient never raise the same alert twice, and two
amendments of one response never interleave (one wins, the other gets 409 or runs after it)."""

from __future__ import annotations

import threading
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.auth.caller import Caller
from fhir_norse.outcomes import FhirError
from fhir_norse.server.context import RequestContext
from tests.intake_support import NF21_STATIC, create_patient, nf21_answers, response, search


def run_together(*jobs: Any) -> list[Any]:
    barrier = threading.Barrier(len(jobs))
    results: list[Any] = [None] * len(jobs)

    def run(n: int) -> None:
        barrier.wait()
        try:
            results[n] = jobs[n]()
        except FhirError as error:
            results[n] = error

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_scoring_runs_for_one_patient_raise_one_alert(app: FastAPI, system_client: TestClient) -> None:
    service = app.state.service
    ctx = RequestContext(caller=Caller.operator(), base_url="http://testserver/fhir")
    patient = create_patient(system_client)
    bodies = [
        response(
            NF21_STATIC, nf21_answers({"suicide": 7}), patient=patient, authored=f"2026-03-0{d}T09:00:00Z"
        )
        for d in (2, 3)
    ]
    results = run_together(*(lambda b=b: service.create(ctx, "QuestionnaireResponse", b) for b in bodies))
    assert [r.status for r in results] == [201, 201]
    flags = search(system_client, f"Flag?subject=Patient/{patient}")
    assert [f["status"] for f in flags] == ["active"]
    assert len(search(system_client, f"Task?patient=Patient/{patient}")) == 1
    assert len(search(system_client, f"DiagnosticReport?subject=Patient/{patient}")) == 2
