"""Issue 12, bad input on every route (items 12 and 16), on SQLite and PostgreSQL: bodies nested past the
limit, searches with too many parameters or values or running too long, numbers past what a database
holds. Each answer is a 4xx OperationOutcome that names the limit, nothing is written, and the server
answers normally afterwards.

The routes come from the interaction table (:data:`fhir_norse.server.interactions.INTERACTIONS`), the
Bundle entry kinds and the registered operations, so a route added later is covered by the same checks.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from fhir_norse.server.interactions import INTERACTIONS, Interaction
from fhir_norse.server.validation import MAX_JSON_DEPTH
from fhir_norse.store.search import engine
from fhir_norse.store.search.request import SearchLimits
from tests.fhir_r4_client import check_response
from tests.tokens import bearer

FHIR = {"Content-Type": "application/fhir+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}
EXT = "http://example.org/ext"
LIMITS = SearchLimits()


# --- bodies nested to a given depth (built as text: the JSON encoders stop at 255 levels) --------------


def extension_text(depth: int) -> str:
    """An Extension that, placed at depth 3 (``Resource.extension[0]``), makes the resource nest exactly
    ``depth`` objects and arrays deep: extensions within extensions, a CodeableConcept at the bottom
    for an even depth."""
    levels = (depth - 1) // 2
    bottom = (
        f'{{"url":"{EXT}","valueString":"x"}}'
        if depth % 2
        else f'{{"url":"{EXT}","valueCodeableConcept":{{"text":"x"}}}}'
    )
    return f'{{"url":"{EXT}","extension":[' * (levels - 1) + bottom + "]}" * (levels - 1)


def patient_text(depth: int, res_id: str | None = None) -> str:
    """A valid Patient nesting exactly ``depth`` deep."""
    identity = f'"id":"{res_id}",' if res_id else ""
    return f'{{"resourceType":"Patient",{identity}"extension":[{extension_text(depth)}]}}'


def patch_text(depth: int) -> str:
    """A JSON Patch document nesting exactly ``depth`` deep (its value one level below the resource's
    extension array)."""
    return f'[{{"op":"add","path":"/extension","value":[{extension_text(depth - 1)}]}}]'


def transaction_text(entry_resource: str, kind: str = "transaction") -> str:
    return (
        f'{{"resourceType":"Bundle","type":"{kind}","entry":[{{"resource":{entry_resource},'
        '"request":{"method":"POST","url":"Patient"}}]}'
    )


def patch_entry_bundle(kind: str, patient: str, document: str) -> str:
    binary = {"resourceType": "Binary", "contentType": "application/json-patch+json"}
    binary["data"] = base64.b64encode(document.encode()).decode()
    entry = {"resource": binary, "request": {"method": "PATCH", "url": f"Patient/{patient}"}}
    return orjson.dumps({"resourceType": "Bundle", "type": kind, "entry": [entry]}).decode()


# --- helpers --------------------------------------------------------------------------------------------


def written(app: FastAPI) -> int:
    """History rows of everything but AuditEvents (refusals are audited): what a refusal must not add."""
    with app.state.service.storage.read() as view:
        return int(view.history_count() - view.history_count(res_type="AuditEvent"))


def assert_refused(answer: Any, status: int = 400, code: str = "too-costly", text: str = "") -> None:
    assert answer.status_code == status, answer.text
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == code, outcome
    assert text in outcome["issue"][0]["diagnostics"], outcome


def assert_still_serving(client: TestClient, patient: str) -> None:
    assert client.get(f"/fhir/Patient/{patient}").status_code == 200
    assert client.get("/fhir/Patient?_count=1").status_code == 200


@pytest.fixture
def patient(system_client: TestClient) -> str:
    answer = system_client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=FHIR)
    assert answer.status_code == 201
    return str(answer.json()["id"])


def url_of(interaction: Interaction, patient: str, query: str = "") -> str:
    path = interaction.path.format(res_type="Patient", res_id=patient, version="1")
    if interaction.needs_query and not query:
        query = "identifier=urn:x|no-such"
    return f"/fhir{path}" + (f"?{query}" if query else "")


# --- item 12: nesting -----------------------------------------------------------------------------------

BODY_ROUTES = [i for i in INTERACTIONS if i.body in ("resource", "patch")]


def send_body(client: TestClient, interaction: Interaction, patient: str, depth: int) -> Any:
    url = url_of(interaction, patient)
    if interaction.body == "patch":
        return client.request(interaction.method, url, content=patch_text(depth), headers=JSON_PATCH)
    res_id = patient if "{res_id}" in interaction.path else None
    return client.request(interaction.method, url, content=patient_text(depth, res_id), headers=FHIR)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 500])
@pytest.mark.parametrize("interaction", BODY_ROUTES, ids=lambda i: f"{i.method} {i.path}")
def test_a_body_nested_too_deep_is_refused_on_every_route(
    app: FastAPI, system_client: TestClient, patient: str, interaction: Interaction, depth: int
) -> None:
    """Item 12: 500 levels of extensions answered 500 (RecursionError); now 400 ``too-costly`` on
    create, update, conditional update and PATCH alike."""
    before = written(app)
    assert_refused(send_body(system_client, interaction, patient, depth), text=f"{MAX_JSON_DEPTH} levels")
    assert written(app) == before
    assert_still_serving(system_client, patient)


@pytest.mark.parametrize("interaction", BODY_ROUTES, ids=lambda i: f"{i.method} {i.path}")
def test_a_body_at_the_nesting_limit_is_processed(
    system_client: TestClient, patient: str, interaction: Interaction
) -> None:
    """The limit sits below Python's recursion limit on every path that walks a body: a resource nested
    exactly as deep as allowed is validated, indexed and stored."""
    answer = send_body(system_client, interaction, patient, MAX_JSON_DEPTH)
    assert answer.status_code in (200, 201), answer.text


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_a_bundle_nested_too_deep_is_refused(
    app: FastAPI, system_client: TestClient, patient: str, kind: str
) -> None:
    """Item 12: the Bundle is one body (its entries three levels down), checked before any entry runs;
    a PATCH entry's JSON Patch is a body of its own inside it."""
    before = written(app)
    bundle = transaction_text(patient_text(MAX_JSON_DEPTH - 2), kind)
    assert_refused(system_client.post("/fhir", content=bundle, headers=FHIR))
    answer = system_client.post(
        "/fhir", content=patch_entry_bundle(kind, patient, patch_text(500)), headers=FHIR
    )
    if kind == "transaction":
        assert_refused(answer)
    else:
        assert answer.status_code == 200, answer.text
        (entry,) = answer.json()["entry"]
        assert entry["response"]["status"].startswith("400")
        assert entry["response"]["outcome"]["issue"][0]["code"] == "too-costly"
    assert written(app) == before
    # At the limit, both are processed.
    fits = system_client.post(
        "/fhir", content=transaction_text(patient_text(MAX_JSON_DEPTH - 3), kind), headers=FHIR
    )
    assert fits.status_code == 200, fits.text
    assert_still_serving(system_client, patient)


def test_every_operation_refuses_a_body_nested_too_deep(
    app: FastAPI, system_client: TestClient, patient: str
) -> None:
    """Item 12: ``$validate`` (a bare resource or in Parameters) and every other operation check the
    depth of their body before they run."""
    before = written(app)
    deep = patient_text(500)
    parameters = f'{{"resourceType":"Parameters","parameter":[{{"name":"resource","resource":{deep}}}]}}'
    for operation in app.state.service.operations:
        if operation.system_level:
            urls = [f"/fhir/${operation.name}"]
            for body in (deep, parameters):
                assert_refused(system_client.post(urls[0], content=body, headers=FHIR))
            continue
        res_type = "Patient" if operation.applies_to("Patient") else operation.types[0]
        urls = []
        if operation.type_level:
            urls.append(f"/fhir/{res_type}/${operation.name}")
        if operation.instance_level:
            urls.append(f"/fhir/{res_type}/{patient}/${operation.name}")
        for url in urls:
            for body in (deep, parameters):
                assert_refused(system_client.post(url, content=body, headers=FHIR))
    assert written(app) == before
    valid = system_client.post("/fhir/Patient/$validate", content=patient_text(MAX_JSON_DEPTH), headers=FHIR)
    assert valid.status_code == 200 and valid.json()["issue"][0]["severity"] == "information", valid.text
    assert_still_serving(system_client, patient)


@pytest.mark.parametrize("copies", [2, 12])
def test_a_patch_cannot_nest_a_resource_past_the_limit(
    system_client: TestClient, patient: str, copies: int
) -> None:
    """Item 12: a small JSON Patch can nest a resource ever deeper (copies of a subtree into itself): the
    patched resource is checked too, and the resource is left as it was."""
    url = f"/fhir/Patient/{patient}"
    shallow = [{"op": "add", "path": "/extension", "value": [orjson.loads(extension_text(40))]}]
    assert system_client.patch(url, content=orjson.dumps(shallow), headers=JSON_PATCH).status_code == 200
    # Into the extension array of the 18th of the 19 nested extensions.
    target = "/extension/0" * 18 + "/extension/-"
    document = [{"op": "copy", "from": "/extension/0", "path": target}] * copies
    assert_refused(system_client.patch(url, content=orjson.dumps(document), headers=JSON_PATCH), text="nest")
    assert system_client.get(url).json()["meta"]["versionId"] == "2"
    assert_still_serving(system_client, patient)


def test_a_patch_cannot_grow_a_resource_past_the_body_limit(system_client: TestClient, patient: str) -> None:
    """A JSON Patch is bounded by the body limit, but each ``copy`` can double the resource: 40 copies
    would build terabytes. Refused with 413 before the memory is spent, and the resource left as it was."""
    url = f"/fhir/Patient/{patient}"
    seed = [{"op": "add", "path": "/name", "value": [{"text": "x" * 1000}]}]
    assert system_client.patch(url, content=orjson.dumps(seed), headers=JSON_PATCH).status_code == 200
    doubling = [{"op": "copy", "from": "/name", "path": f"/name/{i % 2}"} for i in range(40)]
    assert_refused(
        system_client.patch(url, content=orjson.dumps(doubling), headers=JSON_PATCH),
        status=413,
        text="larger",
    )
    assert system_client.get(url).json()["meta"]["versionId"] == "2"
    # A patch that copies a little is applied as before.
    few = [{"op": "copy", "from": "/name/0", "path": "/name/-"}] * 3
    assert system_client.patch(url, content=orjson.dumps(few), headers=JSON_PATCH).status_code == 200
    assert len(system_client.get(url).json()["name"]) == 4
    assert_still_serving(system_client, patient)


# --- encodings: bytes that are not UTF-8 JSON, in bodies, paths and search values ------------------------

BAD_BODIES = {
    "invalid UTF-8": b'{"resourceType":"Patient","name":[{"family":"\xff\xfe"}]}',
    "UTF-16 with a byte order mark": '{"resourceType":"Patient"}'.encode("utf-16"),
    "a lone surrogate escape": b'{"resourceType":"Patient","name":[{"family":"\\ud800"}]}',
    "a NUL byte outside a string": b'{"resourceType":"Patient"}\x00',
    "not JSON at all": b"\x89PNG\r\n\x1a\n",
}


@pytest.mark.parametrize("body", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
@pytest.mark.parametrize("interaction", BODY_ROUTES, ids=lambda i: f"{i.method} {i.path}")
def test_a_body_that_is_not_utf8_json_is_refused_on_every_route(
    system_client: TestClient, patient: str, interaction: Interaction, body: bytes
) -> None:
    """Every body route answers bytes it cannot read as UTF-8 JSON with a 400 OperationOutcome."""
    before = written(system_client.app)  # type: ignore[arg-type]
    headers = JSON_PATCH if interaction.body == "patch" else FHIR
    answer = system_client.request(
        interaction.method, url_of(interaction, patient), content=body, headers=headers
    )
    assert 400 <= answer.status_code < 500, answer.text
    assert answer.json()["resourceType"] == "OperationOutcome"
    assert written(system_client.app) == before  # type: ignore[arg-type]
    assert_still_serving(system_client, patient)


@pytest.mark.parametrize(
    "path",
    [
        "/fhir/Patient/%FF%FE",
        "/fhir/Patient?name=%FF%FE",
        "/fhir/Patient?name=%C0%AF",
        "/fhir/Patient?family%FF=x",
        "/fhir/Patient/x/_history/%FF",
        "/fhir/Patient?_id=%00",
    ],
)
def test_paths_and_search_values_that_are_not_utf8_are_answered(
    system_client: TestClient, patient: str, path: str
) -> None:
    """Percent-encoded bytes that are not UTF-8 (or a NUL) in an id, a parameter name or a value: a 4xx
    OperationOutcome, never a 500."""
    answer = system_client.get(path)
    assert 400 <= answer.status_code < 500, answer.text
    assert answer.json()["resourceType"] == "OperationOutcome"
    assert_still_serving(system_client, patient)


# --- item 16: parameter and value counts, the time limit --------------------------------------------------

TOO_MANY_PARAMETERS = "&".join(f"name=n{i}" for i in range(LIMITS.max_parameters + 1))
REPORTED_PARAMETERS = "&".join(f"name=n{i}" for i in range(500))  # the case: 500 on SQLite
TOO_MANY_VALUES = "_id=" + ",".join(f"id{i}" for i in range(LIMITS.max_values + 1))
SPREAD_VALUES = "&".join(
    "given=" + ",".join(f"g{i}-{j}" for j in range(LIMITS.max_values // 10 + 1)) for i in range(10)
)
SEARCH_ROUTES = [i for i in INTERACTIONS if i.code == "search-type" or i.needs_query]


def send_query(client: TestClient, interaction: Interaction, patient: str, query: str) -> Any:
    if interaction.body == "form":
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        return client.post(url_of(interaction, patient), content=query.encode(), headers=form)
    if interaction.body == "resource":
        return client.request(
            interaction.method,
            url_of(interaction, patient, query),
            json={"resourceType": "Patient"},
            headers=FHIR,
        )
    return client.request(interaction.method, url_of(interaction, patient, query))


@pytest.mark.parametrize(
    ("query", "text"),
    [
        (TOO_MANY_PARAMETERS, f"at most {LIMITS.max_parameters}"),
        (REPORTED_PARAMETERS, f"at most {LIMITS.max_parameters}"),
        (TOO_MANY_VALUES, f"at most {LIMITS.max_values}"),
        (SPREAD_VALUES, f"at most {LIMITS.max_values}"),
    ],
    ids=["parameters", "500-parameters", "values", "values-over-parameters"],
)
@pytest.mark.parametrize("interaction", SEARCH_ROUTES, ids=lambda i: f"{i.method} {i.path}")
def test_a_search_past_the_bounds_is_refused_on_every_route(
    app: FastAPI, system_client: TestClient, patient: str, interaction: Interaction, query: str, text: str
) -> None:
    """Item 16: searches, POST ``_search`` and the conditional update and delete refuse more parameters
    or values than allowed (400 ``too-costly``) before building any SQL; nothing is written."""
    before = written(app)
    assert_refused(send_query(system_client, interaction, patient, query), text=text)
    assert written(app) == before
    assert_still_serving(system_client, patient)


@pytest.mark.parametrize("query", [TOO_MANY_PARAMETERS, TOO_MANY_VALUES])
def test_conditional_criteria_past_the_bounds_are_refused(
    app: FastAPI, system_client: TestClient, patient: str, query: str
) -> None:
    """Item 16: If-None-Exist and a transaction's ifNoneExist, conditional update and GET entries."""
    before = written(app)
    body = {"resourceType": "Patient"}
    assert_refused(system_client.post("/fhir/Patient", json=body, headers={**FHIR, "If-None-Exist": query}))
    for request in (
        {"method": "POST", "url": "Patient", "ifNoneExist": query},
        {"method": "PUT", "url": f"Patient?{query}"},
        {"method": "GET", "url": f"Patient?{query}"},
    ):
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"resource": body, "request": request}],
        }
        if request["method"] == "GET":
            del bundle["entry"][0]["resource"]  # type: ignore[attr-defined]
        assert_refused(system_client.post("/fhir", json=bundle, headers=FHIR))
    assert written(app) == before
    assert_still_serving(system_client, patient)


@pytest.mark.parametrize(
    "query",
    [
        "Observation?value-quantity=1e400",
        "Observation?value-quantity=ap-1.7976931348623157e308",
        "Observation?component-code-value-quantity=http://loinc.org|8480-6$1e400",
        "Observation?date=ap9999-12-31",
        "Patient?_count=99999999999999999999999",
        "Patient/_history?_count=99999999999999999999999",
        "Patient?_cursor=" + "A" * 4000,
    ],
)
def test_numbers_past_what_a_database_holds_are_answered(
    system_client: TestClient, patient: str, query: str
) -> None:
    """Overflows in search values answer (a match or a 400), never a 500."""
    answer = system_client.get(f"/fhir/{query}")
    assert answer.status_code in (200, 400), answer.text
    assert_still_serving(system_client, patient)


# A statement that runs for tens of seconds on either database unless it is stopped.
SLOW_SQL = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 200000000) "
    "SELECT count(*) FROM c"
)


@pytest.fixture
def hurried(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """A client of an app whose searches may take 0.3 s, and whose search first runs a slow statement
    (a search the database takes long over, whatever the data)."""
    original = engine.execute_search

    def slow_search(conn: sa.Connection, request: Any) -> Any:
        conn.exec_driver_sql(SLOW_SQL)
        return original(conn, request)

    monkeypatch.setattr(engine, "execute_search", slow_search)
    application = create_app(settings.model_copy(update={"search_timeout_seconds": 0.3}))
    with TestClient(application, raise_server_exceptions=False) as client:
        client.headers.update(bearer(application))
        client.event_hooks["response"] = [check_response]
        yield client
    application.state.service.storage.engine.dispose()


def test_a_search_past_the_time_limit_is_stopped(hurried: TestClient) -> None:
    """Item 16: every search runs under a time limit on both databases (PostgreSQL ``statement_timeout``
    with ``SET LOCAL``, SQLite's progress handler), in a read or in a transaction; past it, 400
    ``too-costly``, and the connection serves the next request."""
    for attempt in ("GET", "transaction"):
        started = time.monotonic()
        if attempt == "GET":
            answer = hurried.get("/fhir/Patient?name=x")
        else:
            entry = {"request": {"method": "GET", "url": "Patient?name=x"}}
            bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
            answer = hurried.post("/fhir", json=bundle, headers=FHIR)
        assert time.monotonic() - started < 10
        assert_refused(answer, text="longer than this server allows (0.3 s)")
    created = hurried.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=FHIR)
    assert created.status_code == 201
    assert hurried.get(f"/fhir/Patient/{created.json()['id']}").status_code == 200
