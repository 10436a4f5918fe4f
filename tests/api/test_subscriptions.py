"""Topic-based Subscriptions (Subscriptions R5 Backport IG STU 1.1) end to end, on SQLite and PostgreSQL:
Subscriptions created over HTTP, a QuestionnaireResponse scored, the delivery worker ticked, and the
notifications read by a real HTTP receiver on 127.0.0.1 (tests/support/receiver.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from fhir_norse.server.subscriptions.delivery import SubscriptionDelivery
from tests.fhir_r4_client import check_response
from tests.intake_support import (
    FHIR,
    PHQ9,
    PHQ9_ITEMS,
    create_patient,
    post_response,
    publish_questionnaires,
    response,
)
from tests.support.receiver import Receiver, receiver
from tests.tokens import bearer

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
TOPICS = "http://fhir-norse.org/fhir/SubscriptionTopic/"
SCORED = TOPICS + "scored-administration"
ALERT = TOPICS + "alert"
SECRET = "Bearer s3cret-for-the-ehr"


@pytest.fixture
def app(settings: Settings) -> Iterator[FastAPI]:
    # Retries at once (no backoff) and off after three consecutive failures.
    changed = settings.model_copy(update={"subscription_retry_base_s": 0.0, "subscription_max_failures": 4})
    application = create_app(changed)
    publish_questionnaires(application.state.service)
    yield application
    application.state.service.storage.engine.dispose()


@pytest.fixture
def hook() -> Iterator[Receiver]:
    with receiver() as r:
        yield r


def delivery(app: FastAPI) -> SubscriptionDelivery:
    worker: SubscriptionDelivery = app.state.subscription_delivery
    return worker


def tick(app: FastAPI, times: int = 1) -> None:
    for _ in range(times):
        assert delivery(app).tick().ran


def subscription(
    endpoint: str,
    topic: str = SCORED,
    *,
    content: str = "id-only",
    filters: tuple[str, ...] = (),
    headers: tuple[str, ...] = (f"Authorization: {SECRET}",),
    heartbeat: int | None = None,
    max_count: int | None = None,
) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "type": "rest-hook",
        "endpoint": endpoint,
        "payload": "application/fhir+json",
        "_payload": {"extension": [{"url": BACKPORT + "backport-payload-content", "valueCode": content}]},
    }
    if headers:
        channel["header"] = list(headers)
    if heartbeat is not None:
        channel.setdefault("extension", []).append(
            {"url": BACKPORT + "backport-heartbeat-period", "valueUnsignedInt": heartbeat}
        )
    if max_count is not None:
        channel.setdefault("extension", []).append(
            {"url": BACKPORT + "backport-max-count", "valuePositiveInt": max_count}
        )
    body: dict[str, Any] = {
        "resourceType": "Subscription",
        "meta": {"profile": [BACKPORT + "backport-subscription"]},
        "status": "requested",
        "reason": "Tell the EHR",
        "criteria": topic,
        "channel": channel,
    }
    if filters:
        body["_criteria"] = {
            "extension": [{"url": BACKPORT + "backport-filter-criteria", "valueString": f} for f in filters]
        }
    return body


def subscribe(client: TestClient, body: dict[str, Any]) -> str:
    answer = client.post("/fhir/Subscription", json=body, headers=FHIR)
    assert answer.status_code == 201, answer.text
    assert answer.json()["status"] == "requested"
    return str(answer.json()["id"])


def score(client: TestClient, patient: str, *, suicide: bool = False) -> None:
    answers = {i: "LA6568-5" for i in PHQ9_ITEMS[:8]} | {"44260-8": "LA6569-3" if suicide else "LA6568-5"}
    assert post_response(client, response(PHQ9, answers, patient=patient)).status_code == 201


def focus_refs(notification: Any) -> list[str]:
    events = notification.status.get("notification-event", [])
    return [
        part["valueReference"]["reference"] for event in events for part in event if part["name"] == "focus"
    ]


def test_scored_response_notifies_each_matching_subscription_once_per_content_level(
    system_client: TestClient, hook: Receiver, app: FastAPI
) -> None:
    patient = create_patient(system_client)
    other = create_patient(system_client, "Hansen")
    ids = {
        level: subscribe(system_client, subscription(hook.url + f"/{level}", content=level))
        for level in ("empty", "id-only", "full-resource")
    }
    mine = subscribe(
        system_client,
        subscription(hook.url + "/mine", filters=(f"DiagnosticReport?patient=Patient/{patient}",)),
    )
    not_mine = subscribe(
        system_client,
        subscription(hook.url + "/other", filters=(f"DiagnosticReport?patient=Patient/{other}",)),
    )
    tick(app)  # the handshakes: every Subscription becomes active
    handshakes = {r.path for r in hook.of_kind("handshake")}
    assert handshakes == {f"/hook/{p}" for p in ("empty", "id-only", "full-resource", "mine", "other")}
    for res_id in [*ids.values(), mine, not_mine]:
        assert system_client.get(f"/fhir/Subscription/{res_id}").json()["status"] == "active"

    score(system_client, patient)
    tick(app, 2)
    events = {r.path: r for r in hook.events()}
    assert sorted(events) == ["/hook/empty", "/hook/full-resource", "/hook/id-only", "/hook/mine"]
    assert len(hook.events()) == 4  # exactly one each; the filter on the other patient got nothing
    (report,) = [r for r in [system_client.get(f"/fhir/DiagnosticReport?subject=Patient/{patient}").json()]]
    report_id = report["entry"][0]["resource"]["id"]
    focus = f"http://testserver/fhir/DiagnosticReport/{report_id}"
    for note in events.values():
        assert note.body["resourceType"] == "Bundle" and note.body["type"] == "history"
        assert note.headers["authorization"] == SECRET
        assert note.headers["content-type"].startswith("application/fhir+json")
        assert note.event_numbers() == [1]
        assert note.status["events-since-subscription-start"] == ["1"]
        check_response_bundle(note.body)
    empty = events["/hook/empty"]
    assert len(empty.body["entry"]) == 1 and focus_refs(empty) == [] and "topic" not in empty.status
    id_only = events["/hook/id-only"]
    assert focus_refs(id_only) == [focus]
    assert [e["fullUrl"] for e in id_only.body["entry"][1:]] == [focus]
    assert "resource" not in id_only.body["entry"][1]
    assert id_only.body["entry"][1]["request"] == {"method": "POST", "url": "DiagnosticReport"}
    full = events["/hook/full-resource"]
    assert full.body["entry"][1]["resource"]["resourceType"] == "DiagnosticReport"
    assert full.body["entry"][1]["resource"]["id"] == report_id


def check_response_bundle(bundle: dict[str, Any]) -> None:
    """The notification parses with the independent R4 client (fhirclient) as any answer would."""
    import httpx

    check_response(httpx.Response(200, json=bundle, request=httpx.Request("GET", "http://x/fhir/Bundle")))


def test_alert_topic_filters_by_kind_and_events_are_ordered(
    system_client: TestClient, hook: Receiver, app: FastAPI
) -> None:
    patient = create_patient(system_client)
    alerts = subscribe(
        system_client,
        subscription(
            hook.url,
            ALERT,
            filters=("Flag?code=http://fhir-norse.org/fhir/CodeSystem/rom-alerts|suicide-risk",),
        ),
    )
    other_kind = subscribe(
        system_client, subscription(hook.url + "/deterioration", ALERT, filters=("Flag?code=deterioration",))
    )
    tick(app)
    score(system_client, patient, suicide=True)  # raised
    score(system_client, patient)  # resolved: the Flag becomes inactive
    tick(app, 2)
    events = [r for r in hook.events() if r.path == "/hook"]
    assert [r.event_numbers() for r in events] == [[1], [2]]
    assert not [r for r in hook.events() if r.path == "/hook/deterioration"]
    statuses = system_client.get(f"/fhir/Subscription/{alerts}/$status").json()
    (entry,) = statuses["entry"]
    assert {p["name"]: p.get("valueString") for p in entry["resource"]["parameter"]}[
        "events-since-subscription-start"
    ] == "2"
    assert system_client.get(f"/fhir/Subscription/{other_kind}").json()["status"] == "active"


def test_pending_events_share_notifications_up_to_the_max_count(
    system_client: TestClient, hook: Receiver, app: FastAPI
) -> None:
    """Three events pending at once go out in order as [1, 2] and [3] to a subscriber whose
    backport-max-count is 2, and one by one to a subscriber without it."""
    patient = create_patient(system_client)
    subscribe(system_client, subscription(hook.url + "/two", max_count=2))
    subscribe(system_client, subscription(hook.url + "/one"))
    tick(app)  # the handshakes
    for _ in range(3):
        score(system_client, patient)
    tick(app)
    two = [r for r in hook.events() if r.path == "/hook/two"]
    one = [r for r in hook.events() if r.path == "/hook/one"]
    assert [r.event_numbers() for r in two] == [[1, 2], [3]]
    assert [r.event_numbers() for r in one] == [[1], [2], [3]]
    # Each notification names the report of every event it carries, and counts up to its last event.
    focus = [
        part["valueReference"]["reference"]
        for r in two
        for event in r.status["notification-event"]
        for part in event
        if part["name"] == "focus"
    ]
    assert len(focus) == len(set(focus)) == 3 and all("DiagnosticReport/" in f for f in focus)
    assert [r.status["events-since-subscription-start"] for r in two] == [["2"], ["3"]]


def test_retries_deliver_once_after_failures_and_events_replay_a_gap(
    system_client: TestClient, hook: Receiver, app: FastAPI
) -> None:
    patient = create_patient(system_client)
    res_id = subscribe(system_client, subscription(hook.url))
    tick(app)
    hook.answers.extend([500, 500, 500])  # fewer than the four failures that set it off
    score(system_client, patient)
    tick(app)
    assert system_client.get(f"/fhir/Subscription/{res_id}").json()["status"] == "error"
    tick(app, 3)
    assert [r.event_numbers() for r in hook.events()] == [[1]]  # acknowledged once
    assert len([r for r in hook.received if r.kind == "event-notification"]) == 4
    assert system_client.get(f"/fhir/Subscription/{res_id}").json()["status"] == "active"
    # A subscriber that lost event 1 asks for it again.
    replay = system_client.get(
        f"/fhir/Subscription/{res_id}/$events?eventsSinceNumber=1&content=full-resource"
    )
    assert replay.status_code == 200, replay.text
    bundle = replay.json()
    params = {p["name"]: p for p in bundle["entry"][0]["resource"]["parameter"]}
    assert params["type"]["valueCode"] == "query-event"
    assert bundle["entry"][1]["resource"]["resourceType"] == "DiagnosticReport"
    bad = system_client.get(f"/fhir/Subscription/{res_id}/$events?eventsSinceNumber=one")
    assert bad.status_code == 400


def test_failures_set_error_then_off(system_client: TestClient, hook: Receiver, app: FastAPI) -> None:
    res_id = subscribe(system_client, subscription(hook.url))
    hook.answers.extend([503] * 10)
    tick(app)
    first = system_client.get(f"/fhir/Subscription/{res_id}").json()
    assert first["status"] == "error" and "503" in first["error"]
    tick(app, 3)
    assert system_client.get(f"/fhir/Subscription/{res_id}").json()["status"] == "off"
    tick(app)
    assert len(hook.received) == 4  # nothing more once off
    # Its owner restarts it.
    body = system_client.get(f"/fhir/Subscription/{res_id}").json() | {"status": "requested"}
    hook.answers.clear()
    assert system_client.put(f"/fhir/Subscription/{res_id}", json=body, headers=FHIR).status_code == 200
    tick(app)
    assert system_client.get(f"/fhir/Subscription/{res_id}").json()["status"] == "active"
    assert hook.received[-1].kind == "handshake"
    # The headers were kept by the update without channel.header.
    assert hook.received[-1].headers["authorization"] == SECRET


def test_the_secret_header_is_never_returned(system_client: TestClient, hook: Receiver, app: FastAPI) -> None:
    created = system_client.post("/fhir/Subscription", json=subscription(hook.url), headers=FHIR)
    res_id = created.json()["id"]
    answers = [
        created.text,
        system_client.get(f"/fhir/Subscription/{res_id}").text,
        system_client.get("/fhir/Subscription").text,
        system_client.get(f"/fhir/Subscription/{res_id}/_history").text,
        system_client.get("/fhir/_history").text,
        system_client.get(f"/fhir/Subscription/{res_id}/$status").text,
    ]
    tick(app)
    answers.append(system_client.get(f"/fhir/Subscription/{res_id}/_history").text)
    for text in answers:
        assert "s3cret" not in text and "header" not in text
    assert "s3cret" not in "".join(str(r.body) for r in hook.received)
    assert hook.received[0].headers["authorization"] == SECRET
    # Stored sealed, not in clear.
    with app.state.service.storage.read() as view:
        stored = view.conn.exec_driver_sql("SELECT headers_sealed FROM subscription_state").scalar_one()
    assert "s3cret" not in stored


def test_heartbeat_when_nothing_happens(system_client: TestClient, hook: Receiver, app: FastAPI) -> None:
    subscribe(system_client, subscription(hook.url, heartbeat=1))
    tick(app)
    with app.state.service.storage.write() as uow:  # a second ago is long enough past
        uow.conn.exec_driver_sql("UPDATE subscription_state SET last_sent_at = '2000-01-01 00:00:00'")
    tick(app)
    assert [r.kind for r in hook.received] == ["handshake", "heartbeat"]


@pytest.mark.parametrize(
    ("change", "expression"),
    [
        ({"criteria": TOPICS + "no-such-topic"}, "Subscription.criteria"),
        (
            {
                "_criteria": {
                    "extension": [
                        {
                            "url": BACKPORT + "backport-filter-criteria",
                            "valueString": "DiagnosticReport?status=final",
                        }
                    ]
                }
            },
            "Subscription.criteria",
        ),
        ({"channel": {"type": "websocket", "payload": "application/fhir+json"}}, "Subscription.channel.type"),
        (
            {
                "channel": {
                    "type": "rest-hook",
                    "endpoint": "http://ehr.example.org/hook",
                    "payload": "application/fhir+json",
                }
            },
            "Subscription.channel.endpoint",
        ),
        (
            {
                "channel": {
                    "type": "rest-hook",
                    "endpoint": "https://ehr.example.org/hook",
                    "payload": "application/xml",
                }
            },
            "Subscription.channel.payload",
        ),
        (
            {
                "channel": {
                    "type": "rest-hook",
                    "endpoint": "https://ehr.example.org/hook",
                    "payload": "application/fhir+json",
                    "header": ["no colon"],
                }
            },
            "Subscription.channel.header[0]",
        ),
    ],
)
def test_bad_subscriptions_are_refused(
    system_client: TestClient, change: dict[str, Any], expression: str
) -> None:
    body = subscription("https://ehr.example.org/hook") | change
    answer = system_client.post("/fhir/Subscription", json=body, headers=FHIR)
    assert answer.status_code == 400, answer.text
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == [expression]


def test_only_system_scopes_reach_subscriptions(system_client: TestClient, app: FastAPI) -> None:
    patient = create_patient(system_client)
    res_id = subscribe(system_client, subscription("https://ehr.example.org/hook"))
    for token in (
        bearer(app, "patient/*.cruds", patient=patient),
        bearer(app, "user/*.cruds", practitioner="x"),
    ):
        assert system_client.get(f"/fhir/Subscription/{res_id}", headers=token).status_code == 403
        assert system_client.get(f"/fhir/Subscription/{res_id}/$status", headers=token).status_code == 403
        created = system_client.post(
            "/fhir/Subscription", json=subscription("https://ehr.example.org/hook"), headers={**token, **FHIR}
        )
        assert created.status_code == 403
    reader = bearer(app, "system/Patient.rs")
    assert system_client.get(f"/fhir/Subscription/{res_id}", headers=reader).status_code == 403


def test_capability_statement_lists_topics_and_operations(system_client: TestClient) -> None:
    statement = system_client.get("/fhir/metadata").json()
    (entry,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "Subscription"]
    topics = {
        e["valueCanonical"] for e in entry["extension"] if e["url"].endswith("subscriptiontopic-canonical")
    }
    assert {t.split("|")[0] for t in topics} == {
        TOPICS + t for t in ("scored-administration", "alert", "alert-review", "administration-closed")
    }
    assert BACKPORT + "backport-subscription" in entry["supportedProfile"]
    assert {o["name"] for o in entry["operation"]} >= {"status", "events"}


def test_the_topics_are_published_read_only(settings: Settings) -> None:
    """At start-up the content pack's topics are stored as Basic (found by their code), each once,
    and cannot be changed over the API."""
    from tests.api.test_operation_definitions import ROOT

    application = create_app(settings.model_copy(update={"publish_content": True, "content_dir": ROOT}))
    try:
        with TestClient(application, headers=bearer(application), raise_server_exceptions=False) as client:
            client.event_hooks["response"] = [check_response]
            found = client.get("/fhir/Basic?code=http://hl7.org/fhir/fhir-types|SubscriptionTopic").json()
            topics = [e["resource"] for e in found["entry"]]
            urls = {
                x["valueUri"]
                for t in topics
                for x in t["extension"]
                if x["url"].endswith("SubscriptionTopic.url")
            }
            assert urls == {
                TOPICS + t
                for t in ("scored-administration", "alert", "alert-review", "administration-closed")
            }
            one = topics[0]
            changed = client.put(
                f"/fhir/Basic/{one['id']}", json=one | {"created": "2026-01-01"}, headers=FHIR
            )
            assert changed.status_code == 405, changed.text
            assert client.delete(f"/fhir/Basic/{one['id']}").status_code == 405
    finally:
        application.state.service.storage.engine.dispose()
