"""The not-on-track signal over HTTP (issue 19), on SQLite and PostgreSQL: raised once, kept, resolved.

The content pack is this checkout's, with the 2.1.0 mapping's Sad Affect scale and alliance total given a
known expected-recovery model and the signal switched on. Sad Affect: ``6 - 0.2 x 6 ln k`` for an
intake of 6, band -0.5/+0.5; the alliance total: ``x + 0.2 x ln k`` (higher is better), band -0.5/+0.5.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.auth.caller import Caller
from fhir_norse.config import Settings
from fhir_norse.rom.report import assemble_report
from fhir_norse.server.context import RequestContext
from fhir_norse.web.report import ReportPages
from tests.intake_support import FHIR, NF21_STATIC, create_patient, nf21_answers, post_response, response
from tests.rom.test_scoring_http import assert_conforms, code_of, derived, flags
from tests.tokens import bearer

ROOT = Path(__file__).resolve().parents[2]
INTERPRETATION = "http://fhir-norse.org/fhir/CodeSystem/rom-interpretation"


def _model(intake_log_k: float, higher_is_worse: bool) -> dict[str, Any]:
    return {
        "form": "score_k = b0 + b1 ln(k) + b2 intake + b3 intake ln(k), k >= 2 (OLS)",
        "coefficients": {"intercept": 0.0, "log_k": 0.0, "intake": 1.0, "intake_log_k": intake_log_k},
        "band": {"low": -0.5, "high": 0.5, "percentiles": [10, 90]},
        "higher_is_worse": higher_is_worse,
        "max_administration": 20,
        "n_patients": 250,
        "n_episodes": 260,
        "n_scores": 3000,
        "fitted": "2026-11-30",
        "sample": "260 episodes (finished EpisodeOfCare) of a test server",
    }


@pytest.fixture
def app(settings: Settings, tmp_path: Path) -> Iterator[FastAPI]:
    from tests.intake_support import publish_questionnaires

    content = tmp_path / "content"
    for folder in ("mappings", "questionnaires", "profiles"):
        shutil.copytree(ROOT / folder, content / folder)
    path = content / "mappings" / "nf21-2.1.0.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    sad = next(s for s in data["scales"] if s["code"] == "sad")
    sad["expected_recovery"] = _model(-0.2, True)
    sad["not_on_track_signal"] = True
    data["alliance"]["expected_recovery"] = _model(0.2, False)
    data["alliance"]["not_on_track_signal"] = True
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    application = create_app(settings.model_copy(update={"content_dir": content}))
    publish_questionnaires(application.state.service)
    yield application
    application.state.service.storage.engine.dispose()


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        test_client.headers.update(bearer(app))
        yield test_client


def _interpretations(obs: dict[str, Any]) -> list[str]:
    return [c["code"] for i in obs.get("interpretation", []) for c in i.get("coding", [])]


def _ranges(obs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["type"]["coding"][0]["code"]: r for r in obs.get("referenceRange", []) if "type" in r}


def test_not_on_track_is_raised_once_kept_and_resolved(app: FastAPI, client: TestClient) -> None:
    patient = create_patient(client)
    practitioner = client.post(
        "/fhir/Practitioner", json={"resourceType": "Practitioner"}, headers=FHIR
    ).json()
    episode = {
        "resourceType": "EpisodeOfCare",
        "status": "active",
        "patient": {"reference": f"Patient/{patient}"},
        "careManager": {"reference": f"Practitioner/{practitioner['id']}"},
    }
    assert client.post("/fhir/EpisodeOfCare", json=episode, headers=FHIR).status_code == 201
    # Sad Affect: 6 at intake, then 6, 6, 6 (above the band: 5.67, 5.18, 4.84), then 4 (band 3.57-4.57).
    weeks = [6, 6, 6, 6, 4]
    states: list[list[str] | None] = []
    report_at: dict[int, str] = {}
    for n, level in enumerate(weeks, start=1):
        authored = f"2026-03-{2 + 7 * (n - 1):02d}T09:00:00Z"
        posted = post_response(
            client, response(NF21_STATIC, nf21_answers({"sad": level}), patient=patient, authored=authored)
        )
        assert posted.status_code == 201, posted.text
        out = derived(client, patient)
        qr = posted.json()["id"]
        mine = [
            o
            for o in out["Observation"]
            if o["derivedFrom"][0]["reference"].startswith(f"QuestionnaireResponse/{qr}/")
        ]
        sad = next(o for o in mine if code_of(o) == "sad")
        assert_conforms(app, sad)
        ranges = _ranges(sad)
        if n == 1:
            assert "expected-range" not in ranges  # nothing is judged at intake
        else:
            expected = 6 - 1.2 * [0, 0, 0.6931, 1.0986, 1.3863, 1.6094][n]
            assert ranges["expected-range"]["high"]["value"] == pytest.approx(expected + 0.5, abs=0.01)
        assert ("not-on-track" in _interpretations(sad)) == (n in (3, 4))
        (report,) = [r for r in out["DiagnosticReport"] if r["effectiveDateTime"] == authored]
        report_at[n] = report["id"]
        assert ("Sad Affect: above the expected-recovery band" in report["conclusion"]) == (n in (3, 4))
        assert report["conclusion"].startswith("Alert") == (n >= 3)  # the alliance total's, from week 3
        states.append(flags(client, patient).get("not-on-track/sad"))
    assert states == [None, None, ["active"], ["active"], ["inactive"]]

    out = derived(client, patient)
    (flag,) = [f for f in out["Flag"] if f["identifier"][0]["value"] == "not-on-track/sad"]
    assert_conforms(app, flag)
    coding = flag["code"]["coding"][0]
    assert coding["system"] == "http://fhir-norse.org/fhir/CodeSystem/rom-alerts"
    # The display is the content's, in the server's text language.
    assert coding["code"] == "not-on-track" and coding["display"] in ("Not on track", "Ikke i rute")
    assert "expected-recovery band" in flag["code"]["text"]
    assert (
        flag["period"]["start"] == "2026-03-16T09:00:00Z" and flag["period"]["end"] == "2026-03-30T09:00:00Z"
    )
    priority = next(e for e in flag["extension"] if e["url"].endswith("flag-priority"))
    assert priority["valueCodeableConcept"]["coding"][0]["code"] == "PM"  # not urgent
    # One review Task for the care manager, raised with the Flag and not again.
    tasks = [t for t in out["Task"] if t["focus"] == {"reference": f"Flag/{flag['id']}"}]
    assert len(tasks) == 1
    (task,) = tasks
    assert_conforms(app, task)
    assert task["priority"] == "routine" and task["status"] == "requested"
    assert task["owner"] == {"reference": f"Practitioner/{practitioner['id']}"}

    # The alliance total (6 every week; expected to rise 6 -> 7.93, band below 6.33 from week 2) is
    # below its band from the second administration on: raised at the third, kept since.
    assert flags(client, patient).get("not-on-track/alliance:total") == ["active"]
    total = next(
        o
        for o in out["Observation"]
        if code_of(o) == "total" and o["effectiveDateTime"] == "2026-03-16T09:00:00Z"
    )
    assert "not-on-track" in _interpretations(total)
    assert_conforms(app, total)
    # Searchable by kind, as the alert topic filters it.
    found = client.get(
        "/fhir/Flag",
        params={
            "subject": f"Patient/{patient}",
            "code": "http://fhir-norse.org/fhir/CodeSystem/rom-alerts|not-on-track",
        },
    ).json()
    kinds = {
        e["resource"]["identifier"][0]["value"]
        for e in found.get("entry", [])
        if e["resource"]["resourceType"] == "Flag"
    }
    assert kinds == {"not-on-track/sad", "not-on-track/alliance:total"}

    # The clinician's report: the expected course and its band behind the trajectory, with its sample.

    ctx = RequestContext(caller=Caller.operator(), base_url="http://testserver/fhir")
    with app.state.service.session(ctx, read_only=True) as repo:
        shown = assemble_report(repo, patient, administration=report_at[4])
    sad_tr = next(tr for g in shown.domains for tr in g.trajectories if tr.code == "sad")
    assert sad_tr.expected is not None and sad_tr.expected.intake == 6
    assert [k for k, *_ in sad_tr.expected.points] == [2, 3, 4]
    k4 = sad_tr.expected.points[-1]
    assert k4[1] == pytest.approx(6 - 1.2 * 1.3863, abs=1e-3) and k4[3] - k4[1] == pytest.approx(0.5)
    assert {a.kind for a in shown.alerts} >= {"not-on-track"}
    html = ReportPages().report_html(
        shown, "en", pdf_url="/r.pdf", all_scales_url="/r?all=1", other_lang_url="/r?lang=nb"
    )
    caption = "fitted on 260 episodes of 250 patients at this clinic"
    label = next(
        lab
        for lab in re.findall(r'role="img" aria-label="([^"]+)"><svg', html)
        if lab.startswith("Sad Affect:")
    )
    assert caption in label and caption in html
    assert '<th scope="col">Expected (range)</th>' in html
    assert "4.34 (3.84 \u2013 4.84)" in html  # administration 4 in the hidden table
    assert "Not on track (a worse course than expected for the starting point): Sad Affect" in html


def test_without_the_switch_nothing_is_judged(client: TestClient) -> None:
    """The 2.2.0 mapping has no model and no switch: scored exactly as before (no band, no signal)."""
    patient = create_patient(client)
    for n in range(3):
        canonical = NF21_STATIC.replace("2.1.0", "2.2.0")
        answers = nf21_answers({"sad": 6}, version="2.2.0")
        when = f"2026-04-{1 + 7 * n:02d}T09:00:00Z"
        assert (
            post_response(client, response(canonical, answers, patient=patient, authored=when)).status_code
            == 201
        )
    out = derived(client, patient)
    assert all("expected-range" not in _ranges(o) for o in out["Observation"])
    assert not any(f["code"]["coding"][0]["code"] == "not-on-track" for f in out["Flag"])
