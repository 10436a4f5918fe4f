"""Issue 5 benchmark: ingest of completed full-length Norse Feedback 2.1 responses, with scoring.

Target (issue 5): >= 150 responses/s sustained with one worker, p99 <= 100 ms, on SQLite and
PostgreSQL; scoring alone <= 1 ms per response.

    python -m bench.ingest_bench [--database sqlite|postgres|both] [--responses N] [--patients P]
                                 [--json OUT] [--tag TAG] [--profile-ingests K]
    python -m bench.ingest_bench --from-json OUT [OUT ...]     # the Markdown of saved runs

Per database:

1. A fresh database: ``var/bench/ingest-bench.sqlite3`` (deleted first) or the PostgreSQL schema
   ``bench_ingest`` (dropped and recreated), migrated with ``fhir_norse.store.migrate``. The 1M-resource
   ``bench`` schema and ``var/bench/bench.sqlite3`` of the other benchmarks are never touched.
2. The real app (``create_app``, development mode, the content pack published at start-up) driven over
   HTTP in process by one sequential ``fastapi.testclient.TestClient`` (one worker) with a
   ``system/*.cruds`` bearer token.
3. P Patients (each with an active EpisodeOfCare whose care manager is one Practitioner), then N
   completed full-length responses to the static NF 2.1 Questionnaire, posted round-robin over the
   patients with ``authored`` a week apart, so every patient builds a history of N/P administrations
   against which change statistics and alerts run. Every scale is open (each trigger is above its
   opening threshold), so every item is asked; alliance, preference, single and medication items are
   answered too; answers vary with a seeded RNG. Bodies are built before the clock starts.
4. Latency per POST (``perf_counter`` around the call, response read) -> throughput over the run after a
   warm-up of 50, p50/p95/p99/max, and latency by history depth; then what the ingests wrote, from
   ``_summary=count`` search totals (and the row counts of the tables).
5. Where the time goes: ~200 more ingests for fresh patients (same history depths as the main run) with
   timers around the phases (exclusive time; database driver time per phase from SQLAlchemy's cursor
   events; index extraction per resource type; bytes written), and a cProfile of ~100 ingests called
   in process (``FhirService.create``, no HTTP); the stored body sizes and the index rows per
   Observation by search parameter; the reads of one scoring plan with the plan of the slowest.
6. What-ifs, no server code changed: ~200 ingests after ``ANALYZE``; on SQLite, also with the
   server's ``sqlite_synchronous=NORMAL``; one ingest's index rows inserted again (executemany,
   multi-row INSERT, ``insertmanyvalues``, COPY, foreign-key checks off) in rolled-back transactions;
   index extraction with and without the FHIRPath fast path.

``--tag TAG`` uses ``var/bench/ingest-TAG.sqlite3`` and the schema ``bench_ingest_TAG`` instead, so that
two runs cannot drop each other's database. ``--json`` is rewritten after each database.

Scoring alone: the pure ``score_administration`` on the same responses with a history of 5 prior
administrations (in process, no database), per call, plus its own phase split.

Prints Markdown to stdout; ``--json OUT`` writes the raw figures.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import math
import os
import platform
import pstats
import random
import re
import sqlite3
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

import fhir_norse.rom.intake as intake_module
import fhir_norse.scoring.pipeline as pipeline_module
import fhir_norse.server.repository as server_repository_module
import fhir_norse.store.storage as repository_module
from bench import common
from fhir_norse.alerts.rules import Alert
from fhir_norse.api.app import create_app
from fhir_norse.auth.audit import AuditRecorder
from fhir_norse.auth.caller import Caller
from fhir_norse.auth.policy import AccessPolicy
from fhir_norse.config import Settings
from fhir_norse.instruments.registry import Instrument, InstrumentRegistry
from fhir_norse.instruments.schema import InstrumentMapping
from fhir_norse.rom.intake import QuestionnaireResponseIntake, derived_id
from fhir_norse.rom.patient import AdaptiveService
from fhir_norse.scoring.pipeline import PriorAdministration, score_administration
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.profiles import ProfileValidator
from fhir_norse.server.repository import Repository
from fhir_norse.store import migrate
from fhir_norse.store.db import create_engine
from fhir_norse.store.storage import ReadView, UnitOfWork
from fhir_norse.store.tables import INDEX_TABLES
from tests.intake_support import NF21_STATIC, nf21, response

AUDIENCE = "http://testserver/fhir"


class Names:
    """Where the benchmark's databases live (``--tag`` gives a run names of its own)."""

    sqlite_file = common.ROOT / "var" / "bench" / "ingest-bench.sqlite3"
    pg_schema = "bench_ingest"

    @classmethod
    def tagged(cls, tag: str) -> None:
        if not re.fullmatch(r"[a-z0-9_]{1,20}", tag):
            raise SystemExit("--tag: 1-20 characters a-z, 0-9 and _")
        cls.sqlite_file = common.ROOT / "var" / "bench" / f"ingest-{tag}.sqlite3"
        cls.pg_schema = f"bench_ingest_{tag}"


WARMUP = 50
PROFILE_INGESTS = 200
SCORING_HISTORY = 5
FHIR_JSON = "application/fhir+json"
TARGET_PER_S = 150.0
TARGET_P99_MS = 100.0
TARGET_SCORING_MS = 1.0
COUNTED = (
    "QuestionnaireResponse",
    "Observation",
    "DiagnosticReport",
    "Flag",
    "Task",
    "Provenance",
    "AuditEvent",
)
START = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)

Json = dict[str, Any]


# ----------------------------------------------------------------------------------------- figures
# ----------------------------------------------------------------------------------------- workload
def full_length_answers(rng: random.Random) -> dict[str, str]:
    """One full-length NF 2.1 administration: every trigger above its scale's opening threshold (so
    every scale is open and every item asked), the other items near the trigger's level, about 1 % of
    them 'not relevant' and 1 % 'prefer not to answer'; every alliance, preference, single and
    medication item answered."""
    mapping = nf21()
    answers: dict[str, str] = {}
    level: dict[str, int] = {}
    for scale in mapping.scales:
        if scale.trigger is None:
            continue
        problem = rng.randint(math.floor(scale.open_if_trigger_gt) + 1, 7)
        level[scale.code] = problem
        answers[scale.trigger] = str(8 - problem if scale.trigger in scale.reverse_keyed else problem)
    for scale in mapping.scales:
        trigger = mapping.trigger_of(scale)
        owner = scale if scale.trigger is not None else mapping.scale_of_item(trigger)
        raw = int(answers[trigger])
        opened = (8 - raw if trigger in owner.reverse_keyed else raw) > scale.open_if_trigger_gt
        assert opened, f"{scale.code} would stay closed"
        centre = level.get(scale.code, rng.randint(1, 7))
        for link_id in scale.items:
            if link_id == scale.trigger:
                continue
            draw = rng.random()
            if draw < 0.01:
                answers[link_id] = "not-relevant"
            elif draw < 0.02:
                answers[link_id] = "prefer-not"
            else:
                problem = min(7, max(1, centre + rng.randint(-2, 1)))
                answers[link_id] = str(8 - problem if link_id in scale.reverse_keyed else problem)
    for link_id in mapping.alliance.items:
        answers[link_id] = str(rng.choice((4, 5, 5, 6, 6, 6, 7, 7, 7, 7)))
    for pref in mapping.preferences:
        answers[pref.link_id] = rng.choice(("less", "as-now", "as-now", "more"))
    for item in [*mapping.single, *mapping.medication]:
        answers[item.link_id] = str(rng.randint(1, 7))
    return answers


def full_length_response(rng: random.Random, patient: str, administration: int) -> Json:
    authored = START + timedelta(weeks=administration, minutes=rng.randint(0, 600))
    return response(
        NF21_STATIC,
        full_length_answers(rng),
        patient=patient,
        authored=authored.isoformat(timespec="seconds"),
    )


def count_items(body: Json) -> int:
    def walk(items: list[Json]) -> int:
        return sum(walk(i.get("item", [])) if "item" in i else len(i.get("answer", [])) for i in items)

    return walk(body["item"])


# ----------------------------------------------------------------------------------------- databases
def fresh_database(kind: str) -> str:
    """A new, migrated database for this benchmark only; returns its URL."""
    if kind == "sqlite":
        Names.sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{Names.sqlite_file}{suffix}").unlink(missing_ok=True)
        url = f"sqlite:///{Names.sqlite_file}"
    else:
        admin = sa.create_engine(common.PG_SERVER, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {Names.pg_schema} CASCADE")
            conn.exec_driver_sql(f"CREATE SCHEMA {Names.pg_schema}")
        admin.dispose()
        url = f"{common.PG_SERVER}?options=-csearch_path%3D{Names.pg_schema}"
    engine = create_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    return url


def database_info(engine: sa.Engine) -> dict[str, Any]:
    info: dict[str, Any] = {"dialect": engine.dialect.name}
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            info["version"] = sqlite3.sqlite_version
            info["synchronous"] = conn.exec_driver_sql("PRAGMA synchronous").scalar_one()
            info["journal_mode"] = conn.exec_driver_sql("PRAGMA journal_mode").scalar_one()
        else:
            info["version"] = conn.exec_driver_sql("SHOW server_version").scalar_one()
            for key in ("synchronous_commit", "fsync", "shared_buffers"):
                info[key] = conn.exec_driver_sql(f"SHOW {key}").scalar_one()
    return info


def table_rows(engine: sa.Engine) -> dict[str, int]:
    names = ["resource", "resource_history", *(t.name for t in INDEX_TABLES)]
    with engine.connect() as conn:
        return {n: int(conn.exec_driver_sql(f"SELECT count(*) FROM {n}").scalar_one()) for n in names}


def stored_shape(engine: sa.Engine) -> dict[str, Any]:
    """What the stored resources look like: per resource type the count and mean body size (JSON
    text), and per Observation the index rows of each (table, search parameter)."""
    sqlite = engine.dialect.name == "sqlite"
    size = "length(CAST(body AS TEXT))" if sqlite else "octet_length(body::text)"
    out: dict[str, Any] = {"bodies": {}, "observation_rows": {}}
    with engine.connect() as conn:
        for res_type, n, mean in conn.exec_driver_sql(
            f"SELECT res_type, count(*), avg({size}) FROM resource GROUP BY res_type ORDER BY 2 DESC"
        ):
            out["bodies"][str(res_type)] = {"count": int(n), "mean_bytes": float(mean or 0)}
        observations = max(1, out["bodies"].get("Observation", {}).get("count", 0))
        rows: dict[str, float] = {}
        for table in INDEX_TABLES:
            for param, n in conn.exec_driver_sql(
                f"SELECT param, count(*) FROM {table.name} WHERE res_type = 'Observation' GROUP BY param"
            ):
                rows[f"{table.name}: {param}"] = int(n) / observations
        out["observation_rows"] = dict(sorted(rows.items(), key=lambda kv: -kv[1]))
    return out


def database_size_mb(engine: sa.Engine) -> float | None:
    if engine.dialect.name == "sqlite":
        size = sum(
            Path(f"{Names.sqlite_file}{s}").stat().st_size
            for s in ("", "-wal")
            if Path(f"{Names.sqlite_file}{s}").exists()
        )
        return round(size / 1e6, 1)
    with engine.connect() as conn:
        size = conn.execute(
            sa.text(
                "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname = :s AND c.relkind = 'r'"
            ),
            {"s": Names.pg_schema},
        ).scalar_one()
    return round(float(size) / 1e6, 1) if size is not None else None


# ----------------------------------------------------------------------------------------- the app
def build_app(url: str) -> FastAPI:
    settings = Settings(database_url=url, mode="development", publish_content=True, log_level="WARNING")
    return create_app(settings)


def bearer(app: FastAPI) -> dict[str, str]:
    token, _jti = app.state.token_service.issue(
        subject="bench-ingest",
        client_id="bench-ingest",
        scope="system/*.cruds",
        audience=AUDIENCE,
        ttl=6 * 3600,
    )
    return {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON, "Accept": FHIR_JSON}


def post(client: TestClient, headers: dict[str, str], res_type: str, body: Json | bytes) -> Json:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    answer = client.post(f"/fhir/{res_type}", content=content, headers=headers)
    if answer.status_code != 201:
        raise SystemExit(f"POST {res_type}: {answer.status_code} {answer.text[:2000]}")
    result: Json = answer.json()
    return result


def create_patients(client: TestClient, headers: dict[str, str], n: int, tag: str) -> list[str]:
    """``n`` Patients, each in an active EpisodeOfCare managed by one Practitioner (the owner of the
    Tasks urgent alerts raise)."""
    clinician = post(
        client, headers, "Practitioner", {"resourceType": "Practitioner", "name": [{"family": f"Lege {tag}"}]}
    )
    ids: list[str] = []
    for i in range(n):
        patient = post(
            client,
            headers,
            "Patient",
            {
                "resourceType": "Patient",
                "identifier": [{"system": "urn:oid:2.16.578.1.12.4.1.4.1", "value": f"{tag}{i:08d}"}],
                "name": [{"family": f"Pasient{tag}{i}", "given": ["Bench"]}],
                "gender": "female" if i % 2 else "male",
                "birthDate": f"{1950 + i % 50}-0{1 + i % 9}-1{i % 10}",
            },
        )
        post(
            client,
            headers,
            "EpisodeOfCare",
            {
                "resourceType": "EpisodeOfCare",
                "status": "active",
                "patient": {"reference": f"Patient/{patient['id']}"},
                "careManager": {"reference": f"Practitioner/{clinician['id']}"},
                "period": {"start": "2024-12-01"},
            },
        )
        ids.append(str(patient["id"]))
    return ids


def workload(rng: random.Random, patients: Sequence[str], per_patient: int) -> list[tuple[int, bytes]]:
    """(history depth, body) in posting order: round-robin over the patients, a week apart."""
    out: list[tuple[int, bytes]] = []
    for administration in range(per_patient):
        for patient in patients:
            out.append((administration, orjson.dumps(full_length_response(rng, patient, administration))))
    return out


def search_total(client: TestClient, headers: dict[str, str], query: str) -> int:
    answer = client.get(f"/fhir/{query}", headers=headers)
    assert answer.status_code == 200, answer.text
    return int(answer.json()["total"])


def counts(client: TestClient, headers: dict[str, str]) -> dict[str, int]:
    return {t: search_total(client, headers, f"{t}?_summary=count") for t in COUNTED}


# ----------------------------------------------------------------------------------------- phases
class Phases:
    """Exclusive wall time per named phase (a phase called inside another is taken out of it), with
    the database driver time (SQLAlchemy cursor events) and statements of each phase.

    Phases called inside an AuditEvent write are named ``audit: <phase>``. Requests are sequential
    (the TestClient thread waits for the app's threads), so one stack serves every thread."""

    def __init__(self) -> None:
        self.stack: list[list[Any]] = []  # [key, resumed at, inside audit]
        self.own: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self.sql_s: dict[str, float] = defaultdict(float)
        self.sql_n: Counter[str] = Counter()
        self._sql_started = 0.0
        # index extraction per resource type: [seconds, calls, rows]
        self.by_type: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])
        self._undo: list[Callable[[], None]] = []
        self.missing: list[str] = []

    def enter(self, name: str) -> None:
        now = time.perf_counter()
        audit = name.startswith("audit")
        if self.stack:
            top = self.stack[-1]
            self.own[top[0]] += now - top[1]
            audit = audit or bool(top[2])
            if top[2] and not name.startswith("audit"):
                name = f"audit: {name}"
        self.stack.append([name, now, audit])

    def leave(self) -> None:
        now = time.perf_counter()
        key, resumed, _ = self.stack.pop()
        self.own[key] += now - resumed
        self.calls[key] += 1
        if self.stack:
            self.stack[-1][1] = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.enter(name)
        try:
            yield
        finally:
            self.leave()

    def wrap(self, owner: Any, attr: str, name: str | Callable[..., str]) -> None:
        """Time ``owner.attr`` as phase ``name`` (or the name ``name(*args, **kwargs)`` gives a call)."""
        original = getattr(owner, attr, None)
        if original is None:  # not in this version of the server: nothing to time
            self.missing.append(f"{getattr(owner, '__name__', type(owner).__name__)}.{attr}")
            return
        had_own = attr in vars(owner)
        own = vars(owner).get(attr)
        phases = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            phases.enter(name if isinstance(name, str) else name(*args, **kwargs))
            try:
                return original(*args, **kwargs)
            finally:
                phases.leave()

        # A static method stays one (else the instance would be passed to it as a first argument).
        setattr(owner, attr, staticmethod(timed) if isinstance(own, staticmethod) else timed)
        self._undo.append((lambda: setattr(owner, attr, own)) if had_own else (lambda: delattr(owner, attr)))

    def _before_sql(self, *_args: Any) -> None:
        self._sql_started = time.perf_counter()

    def _after_sql(self, *_args: Any) -> None:
        key = self.stack[-1][0] if self.stack else "(outside any phase)"
        self.sql_s[key] += time.perf_counter() - self._sql_started
        self.sql_n[key] += 1

    def install_server(self, service: FhirService) -> None:
        """Timers around the phases of a QuestionnaireResponse create (see the report's table)."""
        hook = QuestionnaireResponseIntake
        # Since issue 11 every request runs in a repository session (``FhirService.perform``): the
        # unit of work, the access policy, validation, hooks, storage and audit in ``Repository``.
        self.wrap(FhirService, "create", "server: unit of work, pool checkout, rest of create")
        # The route of every interaction (a create included) since issue 11.
        self.wrap(FhirService, "perform", "server: unit of work, pool checkout, rest of create")
        # The repository validates what callers send (the R4 definitions and the model tier) and,
        # since issue 11, what the server derives (R4 definitions without the model tier, then the
        # profiles it claims: ``Repository.check_derived``): two phases of their own.
        self.wrap(server_repository_module, "validate_resource", _validation_phase)
        self.wrap(Repository, "check_derived", DERIVED + "rest of check_derived")
        self.wrap(ProfileValidator, "validate", DERIVED + "profiles (ProfileValidator.validate)")
        self.wrap(Repository, "reach", "authorization: compartment checks")
        self.wrap(AccessPolicy, "require_writable", "authorization: compartment checks")
        self.wrap(AccessPolicy, "patients_of", "authorization: compartment checks")
        self.wrap(hook, "existing", "intake: identifier (retry) lookup")
        self.wrap(hook, "check", "intake: Questionnaire + subject lookup (rest of check)")
        self.wrap(intake_module, "validate_response", "intake validation (validate_response)")
        self.wrap(hook, "before_commit", "scoring run: rest of after_save")
        self.wrap(hook, "plan", "scoring run: Flags, Task, Provenance, ids (rest of plan)")
        # The history of an instrument with change statistics (NF 2.1) is read by the adaptive
        # service (since issue 6); ``_history`` is the sum-score instruments' lookup.
        self.wrap(hook, "_history", "history search: prior Observations (search + parse)")
        self.wrap(AdaptiveService, "history", "history search: prior Observations (search + parse)")
        self.wrap(hook, "_active_alerts", "history search: active Flags (search + parse)")
        self.wrap(hook, "_owner", "history search: responsible clinician (EpisodeOfCare)")
        self.wrap(intake_module, "score_administration", "scoring (score_administration, pure)")
        self.wrap(pipeline_module, "build_administration", "building Observations + DiagnosticReport")
        self.wrap(hook, "apply", "scoring run: write loop (rest of apply)")
        self.wrap(Repository, "_store", "save: stamp meta (rest of _save, save_new_many)")
        self.wrap(Repository, "save_derived", "save: stamp meta (rest of _save, save_new_many)")
        self.wrap(service.kernel.extractor, "extract", "index extraction (extractor.extract)")
        self._count_extraction(service)
        self.wrap(UnitOfWork, "save", "SQL: INSERT resource, history, index rows")
        self.wrap(UnitOfWork, "save_new", "SQL: INSERT resource, history, index rows")
        self.wrap(UnitOfWork, "advisory_lock", "SQL: advisory locks")
        self.wrap(ReadView, "current", "SQL: point reads (current, lock)")
        self.wrap(UnitOfWork, "lock", "SQL: point reads (current, lock)")
        self.wrap(AuditRecorder, "event", "audit: build AuditEvent")
        self.wrap(Repository, "_store_audit", "audit: store AuditEvent (rest)")
        engine = service.storage.engine
        self.wrap(engine.dialect, "do_commit", "SQL: COMMIT")
        self.wrap(engine.dialect, "do_ping", "SQL: pool pre-ping")
        before, after = self._before_sql, self._after_sql  # one bound method each, to remove them
        sa.event.listen(engine, "before_cursor_execute", before)
        sa.event.listen(engine, "after_cursor_execute", after)
        self._undo.append(lambda: sa.event.remove(engine, "before_cursor_execute", before))
        self._undo.append(lambda: sa.event.remove(engine, "after_cursor_execute", after))

    def _count_extraction(self, service: FhirService) -> None:
        extractor = service.kernel.extractor
        timed = extractor.extract
        by_type = self.by_type

        def counted(resource: Json, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            rows = timed(resource, *args, **kwargs)
            entry = by_type[str(resource.get("resourceType"))]
            entry[0] += time.perf_counter() - t0
            entry[1] += 1
            entry[2] += len(rows)
            return rows

        extractor.extract = counted  # type: ignore[method-assign,assignment]
        self._undo.append(lambda: setattr(extractor, "extract", timed))

    def install_scoring(self) -> None:
        """Timers around the steps of ``score_administration``."""
        p = pipeline_module
        self.wrap(p, "answers_from_response", "read answers from the response")
        self.wrap(p, "score_nf21", "scale, alliance, preference, single-item scores (score_nf21)")
        self.wrap(p, "scale_change_for", "change statistics per scale (scale_change_for)")
        self.wrap(p, "_alliance_changes", "alliance change statistics")
        self.wrap(p, "build_administration", "building Observations + DiagnosticReport")
        self.wrap(p, "_nf21_alerts", "alert rules")
        self.wrap(p, "_conclude_alerts", "alert conclusion text")

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def table(self, n: int, wall_s: float) -> list[dict[str, Any]]:
        """Rows of exclusive time per ``n`` units, largest first; percent of ``wall_s``."""
        keys = set(self.own) | set(self.sql_s)
        rows = [
            {
                "phase": key,
                "ms": self.own.get(key, 0.0) / n * 1000,
                "percent": self.own.get(key, 0.0) / wall_s * 100 if wall_s else 0.0,
                "calls": self.calls.get(key, 0) / n,
                "sql_ms": self.sql_s.get(key, 0.0) / n * 1000,
                "statements": self.sql_n.get(key, 0) / n,
            }
            for key in keys
        ]
        return sorted(rows, key=lambda r: -float(r["ms"]))


DERIVED = "derived resources: "


def _validation_phase(*_args: Any, model: bool = True, **_kwargs: Any) -> str:
    """``validate_resource`` of what a caller sends, or (``model=False``) of what the server derives."""
    if model:
        return "resource validation (validate_resource)"
    return DERIVED + "R4 definitions (validate_resource, model=False)"


CATEGORIES = (
    ("HTTP: TestClient, ASGI, FastAPI, token check, JSON in/out", ("HTTP",)),
    ("resource validation", ("resource validation",)),
    ("intake validation", ("intake",)),
    ("history search (prior Observations, Flags, owner)", ("history search",)),
    ("scoring (pure)", ("scoring (",)),
    ("building resources (Observations, report, Flags, Task, Provenance)", ("building", "scoring run")),
    ("index extraction (FHIRPath)", ("index extraction",)),
    ("derived resources checked against R4 and their profiles (since issue 11)", (DERIVED,)),
    ("SQL writes, point reads, commit", ("SQL:",)),
    ("audit (build + index + store the AuditEvent)", ("audit",)),
    ("other server code (unit of work, stamp, compartments)", ("server", "save:", "authorization")),
)


def categorise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: dict[str, dict[str, float]] = {c: {"ms": 0.0, "percent": 0.0, "sql_ms": 0.0} for c, _ in CATEGORIES}
    for row in rows:
        for name, prefixes in CATEGORIES:
            if str(row["phase"]).startswith(prefixes):
                for k in ("ms", "percent", "sql_ms"):
                    out[name][k] += float(row[k])
                break
        else:
            out.setdefault("other", {"ms": 0.0, "percent": 0.0, "sql_ms": 0.0})
            for k in ("ms", "percent", "sql_ms"):
                out["other"][k] += float(row[k])
    return [{"category": c, **v} for c, v in out.items()]


# ----------------------------------------------------------------------------------------- runs
def ingest(
    client: TestClient,
    headers: dict[str, str],
    bodies: Sequence[tuple[int, bytes]],
    phases: Phases | None = None,
    marks: dict[str, float] | None = None,
) -> tuple[list[float], float]:
    """POST each body; per-request seconds and the wall time of the whole loop (``marks`` gets the
    moment the warm-up ended)."""
    marks = {} if marks is None else marks
    latencies: list[float] = []
    started = time.perf_counter()
    for index, (_depth, body) in enumerate(bodies):
        if index == WARMUP:
            marks["after_warmup"] = time.perf_counter()
        t0 = time.perf_counter()
        if phases is not None:
            phases.enter("HTTP")
        try:
            answer = client.post("/fhir/QuestionnaireResponse", content=body, headers=headers)
        finally:
            if phases is not None:
                phases.leave()
        latencies.append(time.perf_counter() - t0)
        if answer.status_code != 201:
            raise SystemExit(f"QuestionnaireResponse: {answer.status_code} {answer.text[:2000]}")
    marks["end"] = time.perf_counter()
    return latencies, marks["end"] - started


def health_floor(client: TestClient, n: int = 500) -> dict[str, float]:
    samples: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.get("/health")
        samples.append(time.perf_counter() - t0)
    return common.stats_ms(samples[50:])


def cprofile_run(app: FastAPI, bodies: Sequence[tuple[int, bytes]], top: int = 30) -> str:
    """cProfile of ``FhirService.create`` called in process (this thread; no HTTP)."""
    service: FhirService = app.state.service
    ctx = RequestContext(
        caller=Caller(client_id="bench-ingest", scopes=frozenset({"system/*.cruds"}), token_id="bench"),
        base_url=AUDIENCE,
        source_address="127.0.0.1",
        request_id="bench",
    )
    parsed = [orjson.loads(b) for _, b in bodies]
    profile = cProfile.Profile()
    profile.enable()
    for body in parsed:
        service.create(ctx, "QuestionnaireResponse", body)
    profile.disable()
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    root = str(common.ROOT) + "/"
    text = text.replace(root + ".venv/lib/python3.11/site-packages/", "").replace(root, "")
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("ncalls")), 0)
    head = next((ln.strip() for ln in lines if "function calls" in ln), "")
    return "\n".join([head, "", *lines[start:]]).rstrip()


def cpu_wait_s() -> tuple[float, float]:
    """(on-CPU, runnable but waiting for a CPU) seconds of this process's threads, from
    /proc/self/task/*/schedstat: the wait is the contention from other processes on the cores."""
    on_cpu = waiting = 0.0
    for stat in Path("/proc/self/task").glob("*/schedstat"):
        try:
            fields = stat.read_text().split()
        except OSError:
            continue
        on_cpu += int(fields[0]) / 1e9
        waiting += int(fields[1]) / 1e9
    return on_cpu, waiting


def history_plan(app: FastAPI, body: Json) -> dict[str, Any]:
    """The reads of the intake's scoring plan for ``body`` (history, alerts, ...), run as the server
    runs them (``plan`` on a read view, nothing written), timed per statement, with the database's
    plan of the slowest statement (SQLite: EXPLAIN QUERY PLAN; PostgreSQL: EXPLAIN ANALYZE)."""
    service: FhirService = app.state.service
    engine: sa.Engine = service.storage.engine
    hook: Any = service.kernel.hooks["QuestionnaireResponse"]
    ctx = RequestContext(caller=Caller.operator(), base_url=AUDIENCE)
    captured: list[list[Any]] = []  # [statement, parameters, seconds]

    def before(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_rest: Any) -> None:
        captured.append([statement, parameters, time.perf_counter()])

    def after(*_args: Any) -> None:
        captured[-1][2] = time.perf_counter() - captured[-1][2]

    sa.event.listen(engine, "before_cursor_execute", before)
    sa.event.listen(engine, "after_cursor_execute", after)
    try:
        # The server's own repository (as the intake runs its plan), on a transaction that writes nothing.
        with service.storage.write() as uow:
            t0 = time.perf_counter()
            hook.plan(Repository(service.kernel, uow, ctx, server=True), body, rescore=False)
            seconds = time.perf_counter() - t0
    finally:
        sa.event.remove(engine, "before_cursor_execute", before)
        sa.event.remove(engine, "after_cursor_execute", after)
    selects = [c for c in captured if c[0].lstrip().upper().startswith("SELECT")]
    statement, parameters, slowest = max(selects, key=lambda c: float(c[2]))
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "sqlite":
            cursor.execute("EXPLAIN QUERY PLAN " + statement, parameters)
            plan = [str(row[3]) for row in cursor.fetchall()]
        else:
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
            plan = [str(row[0]) for row in cursor.fetchall()]
        cursor.close()
    finally:
        raw.close()
    return {
        "ms": seconds * 1000,
        "statements_ms": [round(float(c[2]) * 1000, 3) for c in captured],
        "slowest_ms": float(slowest) * 1000,
        "slowest_sql": statement,
        "plan": plan,
    }


def analyze(engine: sa.Engine) -> float:
    t0 = time.perf_counter()
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    return time.perf_counter() - t0


def written_bytes(engine: sa.Engine) -> float:
    """Bytes written so far: SQLite runs in this process (``write_bytes`` of /proc/self/io, what went
    to the block layer, WAL and checkpoints included); PostgreSQL's WAL position (the whole cluster)."""
    if engine.dialect.name == "sqlite":
        try:
            fields = dict(ln.split(": ") for ln in Path("/proc/self/io").read_text().splitlines())
            return float(fields["write_bytes"])
        except (OSError, KeyError, ValueError):
            return float("nan")
    with engine.connect() as conn:
        return float(conn.exec_driver_sql("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')").scalar_one())


def timed_run(
    app: FastAPI, client: TestClient, headers: dict[str, str], bodies: Sequence[tuple[int, bytes]]
) -> dict[str, Any]:
    """Ingest ``bodies`` with the phase timers on."""
    engine: sa.Engine = app.state.service.storage.engine
    phases = Phases()
    phases.install_server(app.state.service)
    before = written_bytes(engine)
    try:
        latencies, _wall = ingest(client, headers, bodies, phases)
    finally:
        phases.uninstall()
    written = written_bytes(engine) - before
    rows = phases.table(len(bodies), sum(latencies))
    by_depth: dict[int, list[float]] = defaultdict(list)
    for (depth, _), seconds in zip(bodies, latencies, strict=True):
        by_depth[depth].append(seconds)
    return {
        "by_history_depth": {d: common.stats_ms(v) for d, v in sorted(by_depth.items())},
        "ingests": len(bodies),
        "latency_ms": common.stats_ms(latencies),
        "written_kb_per_response": written / len(bodies) / 1000,
        "rows": rows,
        "categories": categorise(rows),
        "not_timed": phases.missing,
        "sql_statements": sum(phases.sql_n.values()) / len(bodies),
        "sql_ms": sum(phases.sql_s.values()) / len(bodies) * 1000,
        "extract_by_type": {
            t: {"calls": v[1], "ms_per_call": v[0] / v[1] * 1000, "rows_per_call": v[2] / v[1]}
            for t, v in sorted(phases.by_type.items(), key=lambda kv: -kv[1][0])
        },
    }


class CapturedIngest:
    """One ingest as the server performs it: the resources it indexed (stamped, in order) and its
    search-index rows as the repository maps them for INSERT (``_row_values``), by table."""

    def __init__(self, app: FastAPI, client: TestClient, headers: dict[str, str], body: bytes) -> None:
        service: FhirService = app.state.service
        self.indexed: list[Json] = []
        self.rows: dict[str, tuple[sa.Table, list[dict[str, Any]]]] = {}
        self.inserts = 0
        extractor = service.kernel.extractor
        extract = extractor.extract
        row_values = getattr(repository_module, "_row_values", None)
        tables: dict[type, sa.Table] = getattr(repository_module, "_INDEX_TABLE", {})

        def recording(resource: Json) -> Any:
            self.indexed.append(orjson.loads(orjson.dumps(resource)))
            return extract(resource)

        def mapped(pk: int, res_type: str, row: Any) -> Any:
            assert row_values is not None
            values = row_values(pk, res_type, row)
            table = tables[type(row)]
            self.rows.setdefault(table.name, (table, []))[1].append(dict(values))
            return values

        def count(_conn: Any, clause: Any, *_rest: Any) -> None:
            table = getattr(clause, "table", None)
            if (
                isinstance(clause, sa.Insert)
                and isinstance(table, sa.Table)
                and table.name.startswith("idx_")
            ):
                self.inserts += 1

        engine = service.storage.engine
        patched: Any = repository_module
        extractor.extract = recording  # type: ignore[method-assign,assignment]
        if row_values is not None and tables:
            patched._row_values = mapped
        sa.event.listen(engine, "before_execute", count)
        try:
            post(client, headers, "QuestionnaireResponse", body)
        finally:
            sa.event.remove(engine, "before_execute", count)
            if row_values is not None and tables:
                patched._row_values = row_values
            del extractor.extract


def insert_what_if(app: FastAPI, ingest_: CapturedIngest, repeats: int = 15) -> dict[str, Any]:
    """The search-index rows of one ingest inserted again, in transactions rolled back afterwards,
    one statement (or COPY) per table for the whole ingest: executemany; one multi-row INSERT built
    with ``insert().values(rows)`` (compiled by SQLAlchemy each time, in chunks of 60,000 parameters);
    executemany on an engine whose dialect sends multi-row ``VALUES`` itself (SQLAlchemy's
    ``insertmanyvalues``, off by default for INSERTs without RETURNING); on PostgreSQL, COPY."""
    service: FhirService = app.state.service
    engine = service.storage.engine
    merged = ingest_.rows
    if not merged:
        return {}
    batched = create_engine(engine.url.render_as_string(hide_password=False))
    batched.dialect.use_insertmanyvalues_wo_returning = True

    def executemany(conn: sa.Connection) -> None:
        for table, rows in merged.values():
            conn.execute(table.insert(), rows)

    def values(conn: sa.Connection) -> None:
        for table, rows in merged.values():
            step = max(1, 60_000 // len(rows[0]))
            for start in range(0, len(rows), step):
                conn.execute(sa.insert(table).values(rows[start : start + step]))

    def copy(conn: sa.Connection) -> None:
        raw: Any = conn.connection.dbapi_connection
        with raw.cursor() as cursor:
            for table, rows in merged.values():
                columns = list(rows[0])
                with cursor.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as out:
                    for row in rows:
                        out.write_row([row[c] for c in columns])

    sqlite = engine.dialect.name == "sqlite"
    # name -> (engine, insert, with the foreign-key checks of the index rows off)
    variants: dict[str, tuple[sa.Engine, Callable[[sa.Connection], None], bool]] = {
        "executemany": (engine, executemany, False),
        "multi-row INSERT from insert().values(rows), compiled each time": (engine, values, False),
        "executemany, dialect sends multi-row VALUES (insertmanyvalues)": (batched, executemany, False),
    }
    if sqlite:
        variants["executemany, foreign-key checks off"] = (engine, executemany, True)
    else:
        variants["COPY"] = (engine, copy, False)
        variants["COPY, foreign-key checks off (session_replication_role = replica)"] = (engine, copy, True)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(repeats):
            for name, (target, run, fk_off) in list(variants.items()):
                with target.connect() as conn:
                    raw: Any = conn.connection.dbapi_connection
                    if fk_off and sqlite:  # only outside a transaction
                        raw.execute("PRAGMA foreign_keys=OFF")
                    transaction = conn.begin()
                    try:
                        if fk_off and not sqlite:
                            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
                        t0 = time.perf_counter()
                        run(conn)
                        samples[name].append(time.perf_counter() - t0)
                    except sa.exc.DBAPIError:  # e.g. not allowed to change session_replication_role
                        del variants[name]
                        samples.pop(name, None)
                    finally:
                        transaction.rollback()
                        if fk_off and sqlite:
                            raw.execute("PRAGMA foreign_keys=ON")
    finally:
        batched.dispose()
    return {
        "rows": sum(len(r) for _, r in merged.values()),
        "tables": len(merged),
        "inserts_by_server": ingest_.inserts,
        "variants": {name: common.stats_ms(v) for name, v in samples.items()},
    }


def extraction_what_if(app: FastAPI, ingest_: CapturedIngest, repeats: int = 5) -> dict[str, Any]:
    """Index extraction of the resources one ingest indexed: the server's extractor, and, when the
    extractor has a FHIRPath fast path, fhirpathpy alone (``fast=False``) for comparison."""
    service: FhirService = app.state.service
    extractors: dict[str, Any] = {}
    server_extractor = service.kernel.extractor
    fast = getattr(server_extractor, "fast", None)
    extractors[f"server's extractor (fast={fast})" if fast is not None else "server's extractor"] = (
        server_extractor
    )
    if fast is not None:
        factory: Any = type(server_extractor)
        other = factory(service.registry, fast=not fast)
        other.prepare()
        extractors[f"the same with fast={not fast}"] = other
    out: dict[str, Any] = {}
    for name, extractor in extractors.items():
        by_type: dict[str, list[float]] = defaultdict(list)
        for _ in range(repeats):
            per_type: dict[str, float] = defaultdict(float)
            for resource in ingest_.indexed:
                t0 = time.perf_counter()
                extractor.extract(resource)
                per_type[str(resource["resourceType"])] += time.perf_counter() - t0
            for t, v in per_type.items():
                by_type[t].append(v)
        medians = {t: statistics.median(v) * 1000 for t, v in by_type.items()}
        out[name] = {"ms_per_response": sum(medians.values()), "by_type_ms": medians}
    return {"resources": len(ingest_.indexed), "extractors": out}


def run_database(
    kind: str, n: int, p: int, seed: int, profile_ingests: int = PROFILE_INGESTS
) -> dict[str, Any]:
    label = "SQLite" if kind == "sqlite" else "PostgreSQL"
    common.log(f"[{label}] fresh database")
    url = fresh_database(kind)
    t0 = time.perf_counter()
    app = build_app(url)
    startup_s = time.perf_counter() - t0
    engine: sa.Engine = app.state.service.storage.engine
    result: dict[str, Any] = {
        "database": label,
        "startup_s": round(startup_s, 2),
        "db": database_info(engine),
    }
    rng = random.Random(seed)
    per_patient = max(1, n // p)
    extra = max(1, profile_ingests // per_patient)
    with TestClient(app) as client:
        headers = bearer(app)
        common.log(f"[{label}] {p} patients")
        patients = create_patients(client, headers, p, "M")
        bodies = workload(rng, patients, per_patient)[:n]
        result["items_per_response"] = statistics.fmean(count_items(orjson.loads(b)) for _, b in bodies)
        result["body_bytes"] = statistics.fmean(len(b) for _, b in bodies)
        before = counts(client, headers)
        rows_before = table_rows(engine)
        result["health"] = health_floor(client)

        common.log(f"[{label}] ingest {len(bodies)} responses")
        marks: dict[str, float] = {}
        load_before = os.getloadavg()
        cpu_before = cpu_wait_s()
        latencies, wall = ingest(client, headers, bodies, marks=marks)
        cpu_after = cpu_wait_s()
        steady = latencies[WARMUP:]
        steady_wall = marks["end"] - marks["after_warmup"]
        result["ingest"] = {
            "responses": len(bodies),
            "patients": p,
            "administrations_per_patient": per_patient,
            "warmup": WARMUP,
            "wall_s": wall,
            "per_s_whole_run": len(bodies) / wall,
            "per_s_after_warmup": len(steady) / steady_wall,
            "latency_ms": common.stats_ms(steady),
            "latency_ms_warmup": common.stats_ms(latencies[:WARMUP]),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "cpu_ms_per_response": (cpu_after[0] - cpu_before[0]) / len(bodies) * 1000,
            "cpu_wait_ms_per_response": (cpu_after[1] - cpu_before[1]) / len(bodies) * 1000,
        }
        by_depth: dict[int, list[float]] = defaultdict(list)
        for (depth, _), seconds in zip(bodies, latencies, strict=True):
            by_depth[depth].append(seconds)
        result["by_history_depth"] = {d: common.stats_ms(v) for d, v in sorted(by_depth.items())}
        after = counts(client, headers)
        rows_after = table_rows(engine)
        # The count searches themselves store one AuditEvent each (not an ingest's).
        written = {t: after[t] - before[t] for t in COUNTED}
        written["AuditEvent"] -= len(COUNTED)
        result["written_total"] = written
        result["written_per_response"] = {t: v / len(bodies) for t, v in written.items()}
        result["rows_per_response"] = {t: (rows_after[t] - rows_before[t]) / len(bodies) for t in rows_after}
        result["table_rows"] = rows_after
        result["stored"] = stored_shape(engine)
        result["database_mb"] = database_size_mb(engine)
        result["database_kb_per_response"] = (result["database_mb"] or 0.0) * 1000 / len(bodies)
        later = full_length_response(random.Random(seed), patients[0], per_patient)
        result["history_plan"] = history_plan(app, later)

        # Where the time goes: fresh patients, the same history depths as the main run.
        common.log(f"[{label}] phase timers: {extra} x {per_patient} ingests")
        result["phases"] = timed_run(
            app, client, headers, workload(rng, create_patients(client, headers, extra, "T"), per_patient)
        )
        cprof = max(1, profile_ingests // 2 // per_patient)
        common.log(f"[{label}] cProfile: {cprof} x {per_patient} ingests in process")
        patients3 = create_patients(client, headers, cprof, "C")
        result["cprofile"] = cprofile_run(app, workload(rng, patients3, per_patient))

        # What if the planner had statistics (nothing in the server runs ANALYZE)?
        result["analyze_s"] = analyze(engine)
        result["history_plan_analyzed"] = history_plan(app, later)
        common.log(f"[{label}] after ANALYZE: {extra} x {per_patient} ingests")
        what_if: dict[str, Any] = {}
        what_if["analyze"] = timed_run(
            app, client, headers, workload(rng, create_patients(client, headers, extra, "A"), per_patient)
        )
        result["what_if"] = what_if
        common.log(f"[{label}] index-row inserts replayed, extraction compared")
        patient = create_patients(client, headers, 1, "I")[0]
        captured = CapturedIngest(app, client, headers, orjson.dumps(full_length_response(rng, patient, 0)))
        what_if["inserts"] = insert_what_if(app, captured)
        what_if["extraction"] = extraction_what_if(app, captured)
    engine.dispose()
    if kind == "sqlite":
        # The same database (analyzed) with synchronous=NORMAL: commits stop syncing the WAL.
        common.log(f"[{label}] synchronous=NORMAL: {extra} x {per_patient} ingests")
        app2 = create_app(
            Settings(
                database_url=url,
                mode="development",
                publish_content=True,
                log_level="WARNING",
                sqlite_synchronous="NORMAL",
            )
        )
        with TestClient(app2) as client2:
            headers2 = bearer(app2)
            patients4 = create_patients(client2, headers2, extra, "N")
            what_if["synchronous_normal"] = timed_run(
                app2, client2, headers2, workload(rng, patients4, per_patient)
            )
        app2.state.service.storage.engine.dispose()
    return result


# ----------------------------------------------------------------------------------------- scoring alone
def scoring_alone(n: int, seed: int) -> dict[str, Any]:
    """The pure ``score_administration`` with 5 prior administrations (no database)."""
    registry = InstrumentRegistry.from_content_dir(common.ROOT)
    url, _, version = NF21_STATIC.partition("|")
    instrument = registry.for_questionnaire(url, version)
    assert isinstance(instrument, Instrument) and isinstance(instrument.mapping, InstrumentMapping)
    rng = random.Random(seed + 1)
    patient = "Patient/bench"
    issued = "2025-06-01T10:00:00.000Z"
    priors: list[PriorAdministration] = []
    for i in range(SCORING_HISTORY):
        body = full_length_response(rng, "bench", i)
        rid = f"prior-{i}"
        scored = score_administration(
            body,
            instrument,
            response_ref=f"QuestionnaireResponse/{rid}/_history/1",
            patient_ref=patient,
            history=priors,
            id_for=functools.partial(derived_id, rid),
            issued=issued,
        )
        assert scored.scores is not None
        alliance = [*scored.scores.alliance.dimensions.values(), scored.scores.alliance.total]
        priors.append(
            PriorAdministration(
                f"QuestionnaireResponse/{rid}",
                str(body["authored"]),
                {c: s.score for c, s in scored.scores.scales.items() if s.score is not None},
                {a.code: a.mean for a in alliance if a.mean is not None},
            )
        )
    active = [Alert("suicide-risk", "suicide", True, "suicidality trigger above the threshold")]
    bodies = [full_length_response(rng, "bench", SCORING_HISTORY) for _ in range(n)]

    def score(body: Json, i: int) -> Any:
        rid = f"r{i}"
        return score_administration(
            body,
            instrument,
            response_ref=f"QuestionnaireResponse/{rid}/_history/1",
            patient_ref=patient,
            history=priors,
            active_alerts=active,
            id_for=lambda key: derived_id(rid, key),
            issued=issued,
        )

    for i, body in enumerate(bodies[:WARMUP]):
        score(body, i)
    samples: list[float] = []
    resources = 0
    for i, body in enumerate(bodies):
        t0 = time.perf_counter()
        scored = score(body, i)
        samples.append(time.perf_counter() - t0)
        resources += len(scored.resources.resources())
    phases = Phases()
    phases.install_scoring()
    try:
        for i, body in enumerate(bodies):
            with phases.phase("score_administration (rest)"):
                score(body, i)
    finally:
        phases.uninstall()
    return {
        "calls": n,
        "history": SCORING_HISTORY,
        "per_call_ms": common.stats_ms(samples),
        "resources_built_per_call": resources / n,
        "phases": phases.table(n, sum(phases.own.values())),
    }


# ----------------------------------------------------------------------------------------- report
def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _phase_ms(run: dict[str, Any], *prefixes: str) -> float:
    return sum(float(r["ms"]) for r in run["rows"] if str(r["phase"]).startswith(prefixes))


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    w = lines.append
    dbs: list[dict[str, Any]] = results["databases"]
    sc = results["scoring"]
    w("## Ingest with scoring (issue 5): `python -m bench.ingest_bench`")
    w("")
    args = results["args"]
    w(
        f"Run {results['finished']} (UTC), Python {results['python']}, {results['cores']} cores; "
        f"`--responses {args['responses']} --patients {args['patients']} --seed {args['seed']}`. "
        "One sequential in-process client (`fastapi.testclient.TestClient`, `system/*.cruds` token) "
        "against the real app (`create_app`, development mode, content pack published): one worker. "
        "Each request is a completed full-length NF 2.1 response (static Questionnaire, every scale "
        "open, all alliance, preference, single and medication items answered; about "
        f"{_f(dbs[0]['items_per_response'], 0) if dbs else '?'} answered items, "
        f"{_f(dbs[0]['body_bytes'] / 1000, 1) if dbs else '?'} kB of JSON), posted round-robin over the "
        "patients a week apart, so change statistics and alerts run against a stored history of 0 to "
        f"{(dbs[0]['ingest']['administrations_per_patient'] - 1) if dbs else '?'} earlier administrations. "
        f"Latencies in ms (nearest rank) after a warm-up of {WARMUP}; "
        "throughput = responses after the warm-up / wall time from the end of the warm-up to the end "
        "of the run (the client loop included)."
    )
    w("")
    for run in results.get("runs") or [{k: results.get(k) for k in ("args", "finished", "code")}]:
        code = run.get("code") or {}
        a_ = run.get("args") or {}
        w(
            f"- Run finished {run.get('finished')} (UTC): `--responses {a_.get('responses')} "
            f"--patients {a_.get('patients')}`, code at commit {code.get('commit')} "
            f"({code.get('subject')})"
            + (f"; changed in the tree: {', '.join(code['changed'])}" if code.get("changed") else "")
            + "."
        )
    w("")
    w("| Measure | Target |" + "".join(f" {d['database']} | |" for d in dbs))
    w("|---|---|" + "---|---|" * len(dbs))
    row = "| Ingest, sequential, one worker, responses/s | ≥ 150/s |"
    for d in dbs:
        v = d["ingest"]["per_s_after_warmup"]
        row += f" {_f(v, 1)} | {_verdict(v >= TARGET_PER_S)} |"
    w(row)
    row = "| Ingest latency p99 | ≤ 100 ms |"
    for d in dbs:
        v = d["ingest"]["latency_ms"]["p99"]
        row += f" {_f(v)} | {_verdict(v <= TARGET_P99_MS)} |"
    w(row)
    s = sc["per_call_ms"]
    row = "| Scoring alone (`score_administration`, 5 priors), mean per response | ≤ 1 ms |"
    for _ in dbs:
        row += f" {_f(s['mean'], 3)} | {_verdict(s['mean'] <= TARGET_SCORING_MS)} |"
    w(row)
    w("")
    w("| Ingest | n | per s (whole run) | p50 | p95 | p99 | max | mean |")
    w("|---|---|---|---|---|---|---|---|")
    for d in dbs:
        i = d["ingest"]
        lat = i["latency_ms"]
        w(
            f"| {d['database']} | {lat['n']:,} | {_f(i['per_s_whole_run'], 1)} | {_f(lat['p50'])} | "
            f"{_f(lat['p95'])} | {_f(lat['p99'])} | {_f(lat['max'])} | {_f(lat['mean'])} |"
        )
    for d in dbs:
        h = d["health"]
        w(
            f"| {d['database']}: `GET /health` (the floor of any request here) | {h['n']} | - | "
            f"{_f(h['p50'])} | {_f(h['p95'])} | {_f(h['p99'])} | {_f(h['max'])} | {_f(h['mean'])} |"
        )
    w("")
    w(
        f"Scoring alone, {sc['calls']:,} calls in process: mean {_f(s['mean'], 3)} ms, "
        f"p50 {_f(s['p50'], 3)}, p99 {_f(s['p99'], 3)}, max {_f(s['max'], 3)}; "
        f"{_f(sc['resources_built_per_call'], 1)} resources built per call."
    )
    w("")
    w("### Latency by history depth")
    w("")
    w(
        "Mean ms by the number of the patient's earlier administrations already stored. In the main "
        "run the database grows at the same time (round-robin: depth k is the k+1-th tenth of the run); "
        "the phase-timed runs after it ingest every depth at the final database size, before and after "
        "`ANALYZE`."
    )
    w("")
    runs = (("main run", None), ("at final size", "phases"), ("after ANALYZE", "analyze"))
    w(
        "| Earlier administrations | "
        + " | ".join(f"{d['database']} {r}" for d in dbs for r, _ in runs)
        + " |"
    )
    w("|---|" + "---|" * (len(dbs) * len(runs)))

    def depth_stats(d: dict[str, Any], key: str | None) -> dict[Any, Any]:
        if key is None:
            return dict(d["by_history_depth"])
        run = d.get(key) if key == "phases" else (d.get("what_if") or {}).get(key)
        return dict((run or {}).get("by_history_depth") or {})

    depths = sorted({int(k) for d in dbs for k in d["by_history_depth"]})
    for depth in depths:
        cells = []
        for d in dbs:
            for _, key in runs:
                table = depth_stats(d, key)
                st = table.get(depth) or table.get(str(depth)) or {}
                cells.append(_f(st.get("mean")))
        w(f"| {depth} | " + " | ".join(cells) + " |")
    w("")
    for d in dbs:
        i = d["ingest"]
        w(
            f"- {d['database']}: load average {_f(i['loadavg_before'][0])} before the run, "
            f"{_f(i['loadavg_after'][0])} after; the benchmark process's threads ran "
            f"{_f(i['cpu_ms_per_response'], 1)} ms on a CPU per response and waited "
            f"{_f(i['cpu_wait_ms_per_response'], 1)} ms for one (runnable, cores busy with other "
            "processes: `/proc/self/task/*/schedstat`)."
        )
    w("")
    w("### What one ingest writes")
    w("")
    w("Resources per response, from `_summary=count` search totals before and after the run:")
    w("")
    w("| Resource | " + " | ".join(d["database"] for d in dbs) + " |")
    w("|---|" + "---|" * len(dbs))
    for t in COUNTED:
        w(f"| {t} | " + " | ".join(_f(d["written_per_response"][t]) for d in dbs) + " |")
    w(
        "| **resources in total** | "
        + " | ".join(_f(sum(d["written_per_response"].values())) for d in dbs)
        + " |"
    )
    w("")
    w("Rows per response, by table (every resource version also has a `resource_history` row):")
    w("")
    w("| Table | " + " | ".join(d["database"] for d in dbs) + " |")
    w("|---|" + "---|" * len(dbs))
    if dbs:
        for t in dbs[0]["rows_per_response"]:
            w(f"| {t} | " + " | ".join(_f(d["rows_per_response"][t], 1) for d in dbs) + " |")
        w(
            "| **rows in total** | "
            + " | ".join(_f(sum(d["rows_per_response"].values()), 1) for d in dbs)
            + " |"
        )
    w("")
    shaped = [d for d in dbs if d.get("stored")]
    if shaped:
        st = shaped[0]["stored"]
        w(
            f"Stored resources after the run ({shaped[0]['database']}): count and mean JSON body size; "
            "each body is stored twice (`resource` and `resource_history`):"
        )
        w("")
        w("| Resource | count | mean body bytes |")
        w("|---|---|---|")
        for t, v in st["bodies"].items():
            w(f"| {t} | {v['count']:,} | {_f(v['mean_bytes'], 0)} |")
        w("")
        obs_rows = st["observation_rows"]
        w(
            f"Index rows per Observation, by table and search parameter "
            f"({_f(sum(obs_rows.values()), 1)} in all):"
        )
        w("")
        w("| Table: parameter | rows per Observation |")
        w("|---|---|")
        for k, v in obs_rows.items():
            w(f"| {k} | {_f(v, 2)} |")
        w("")
    for d in dbs:
        w(
            f"- {d['database']}: the database holds {_f(d['database_mb'], 1)} MB after the run "
            f"(about {_f(d['database_kb_per_response'], 0)} kB per response ingested, patients included)."
        )
    w("")
    w("### Where the time goes")
    w("")
    if dbs:
        pi = dbs[0]["phases"]["ingests"]
        w(
            f"{pi} more ingests per database for fresh patients (the same history depths as the run "
            "above), with timers around the phases of the server's code: exclusive wall time per "
            "phase (a phase called inside another is taken out of it), ms per response and percent of "
            "the request as measured at the client; *DB driver* is the part of it spent in "
            "`cursor.execute` (SQLAlchemy cursor events). *SQL: INSERT* includes SQLAlchemy's statement "
            "execution and the row mapping (`_row_values`) around the driver. The timers add about 1-2 µs "
            "per wrapped call."
        )
    w("")
    w("| Where | " + " | ".join(f"{d['database']} ms | %" for d in dbs) + " |")
    w("|---|" + "---|---|" * len(dbs))
    if dbs:
        cats = [c["category"] for c in dbs[0]["phases"]["categories"]]
        for c in cats:
            cells = []
            for d in dbs:
                found = next((x for x in d["phases"]["categories"] if x["category"] == c), None)
                cells.append(f"{_f(found['ms'])} | {_f(found['percent'], 1)}" if found else "- | -")
            w(f"| {c} | " + " | ".join(cells) + " |")
        w(
            "| **request at the client (mean)** | "
            + " | ".join(f"**{_f(d['phases']['latency_ms']['mean'])}** | 100" for d in dbs)
            + " |"
        )
        w(
            "| …of which in the DB driver (`cursor.execute`), statements | "
            + " | ".join(
                f"{_f(d['phases']['sql_ms'])} | {_f(d['phases']['sql_statements'], 0)} stmts" for d in dbs
            )
            + " |"
        )
    w("")
    for d in dbs:
        w(f"<details><summary>All phases, {d['database']} (per response)</summary>")
        w("")
        w("| Phase | ms | % | calls | DB driver ms | statements |")
        w("|---|---|---|---|---|---|")
        for r in d["phases"]["rows"]:
            w(
                f"| {r['phase']} | {_f(r['ms'], 3)} | {_f(r['percent'], 1)} | {_f(r['calls'], 1)} | "
                f"{_f(r['sql_ms'], 3)} | {_f(r['statements'], 1)} |"
            )
        w("")
        w("</details>")
        w("")
    w("Index extraction by resource type (`extractor.extract`, in the phase-timed run):")
    w("")
    w(
        "| Resource | "
        + " | ".join(f"{d['database']} calls/response | ms/call | rows/call" for d in dbs)
        + " |"
    )
    w("|---|" + "---|---|---|" * len(dbs))
    types = list(dbs[0]["phases"]["extract_by_type"]) if dbs else []
    for t in types:
        cells = []
        for d in dbs:
            e = d["phases"]["extract_by_type"].get(t)
            n_ = d["phases"]["ingests"]
            cells.append(
                f"{_f(e['calls'] / n_)} | {_f(e['ms_per_call'], 3)} | {_f(e['rows_per_call'], 1)}"
                if e
                else "- | - | -"
            )
        w(f"| {t} | " + " | ".join(cells) + " |")
    w("")
    w("### What-ifs (measured, no server code changed)")
    w("")
    w(
        "Each row is another phase-timed run of the same size for fresh patients on the same database "
        "after the main run, so the rows compare with each other (database size aside): as is; after "
        "`ANALYZE` (nothing in the server runs it, so a fresh database has no planner statistics); "
        "SQLite only, additionally with the server's own setting `sqlite_synchronous=NORMAL` (commits "
        "stop syncing the WAL). *kB written* per response: on SQLite what this process wrote to the "
        "disk (`write_bytes` of /proc/self/io: WAL and checkpoints), on PostgreSQL how far the WAL "
        "advanced (the whole cluster, so other databases' writes count too)."
    )
    w("")
    w(
        "| Variant | DB | mean ms | p50 | p99 | 1 / mean (per s) | history searches ms | "
        "SQL writes + reads ms | COMMIT ms | DB driver ms | kB written |"
    )
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    variants = (
        ("as is", "phases", None),
        ("after ANALYZE", "what_if", "analyze"),
        ("after ANALYZE, synchronous=NORMAL", "what_if", "synchronous_normal"),
    )
    for d in dbs:
        for name, key, sub in variants:
            run = d.get(key) if sub is None else (d.get(key) or {}).get(sub)
            if not run:
                continue
            lat = run["latency_ms"]
            w(
                f"| {name} | {d['database']} | {_f(lat['mean'])} | {_f(lat['p50'])} | {_f(lat['p99'])} | "
                f"{_f(1000 / lat['mean'], 1)} | {_f(_phase_ms(run, 'history search'))} | "
                f"{_f(_phase_ms(run, 'SQL: INSERT', 'SQL: point'))} | {_f(_phase_ms(run, 'SQL: COMMIT'))} | "
                f"{_f(run['sql_ms'])} | {_f(run.get('written_kb_per_response'), 0)} |"
            )
    w("")
    w("")
    inserts = [(d["database"], (d.get("what_if") or {}).get("inserts")) for d in dbs]
    if any(x for _, x in inserts):
        first = next(x for _, x in inserts if x)
        w(
            f"The search-index rows of one ingest ({first['rows']:,} rows in {first['tables']} tables; the "
            f"server issued {first.get('inserts_by_server', '?')} INSERT calls for them) inserted again, one "
            "statement or COPY per table, in transactions rolled back afterwards; median of 15, ms:"
        )
        w("")
        w("| Insert the index rows of one ingest | " + " | ".join(n for n, x in inserts if x) + " |")
        w("|---|" + "---|" * sum(1 for _, x in inserts if x))
        names: list[str] = []
        for _, x in inserts:
            for name in (x or {}).get("variants", {}):
                if name not in names:
                    names.append(name)
        for name in names:
            cells = []
            for _, x in inserts:
                if x:
                    v = (x.get("variants") or {}).get(name)
                    cells.append(_f(v.get("p50")) if v else "-")
            w(f"| {name} | " + " | ".join(cells) + " |")
        w("")
    extraction = [(d["database"], (d.get("what_if") or {}).get("extraction")) for d in dbs]
    if any(x for _, x in extraction):
        first = next(x for _, x in extraction if x)
        w(
            f"Index extraction of the {first['resources']} resources one ingest indexes (the "
            "AuditEvent included), in process, median of 5 (ms per response):"
        )
        w("")
        w("| Extractor | " + " | ".join(n for n, x in extraction if x) + " |")
        w("|---|" + "---|" * sum(1 for _, x in extraction if x))
        for name in first["extractors"]:
            cells = [
                _f(((x or {})["extractors"].get(name) or {}).get("ms_per_response"))
                for _, x in extraction
                if x
            ]
            w(f"| {name} | " + " | ".join(cells) + " |")
        w("")
    for d in dbs:
        for key, when in (("history_plan", "before ANALYZE"), ("history_plan_analyzed", "after ANALYZE")):
            hp = d.get(key)
            if not hp:
                continue
            w(
                f"<details><summary>{d['database']}, {when}: the reads of one scoring plan (patient with "
                f"{(d['ingest']['administrations_per_patient'])} earlier administrations) took "
                f"{_f(hp['ms'])} ms; its slowest statement {_f(hp['slowest_ms'])} ms, plan below</summary>"
            )
            w("")
            w(f"Statements, ms each: {', '.join(_f(x) for x in hp['statements_ms'])}")
            w("")
            w("```")
            w(hp["slowest_sql"])
            w("")
            w("\n".join(hp["plan"]))
            w("```")
            w("</details>")
            w("")
    w("Scoring alone, split (exclusive ms per call, timers on):")
    w("")
    w("| Step | ms | % |")
    w("|---|---|---|")
    for r in sc["phases"]:
        w(f"| {r['phase']} | {_f(r['ms'], 4)} | {_f(r['percent'], 1)} |")
    w("")
    for d in dbs:
        w(
            f"<details><summary>cProfile, {d['database']}: FhirService.create in process "
            "(top by own time)</summary>"
        )
        w("")
        w("```")
        w(d["cprofile"])
        w("```")
        w("</details>")
        w("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--responses", type=int, default=2000)
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--json", type=Path, default=None, help="write the raw figures here (after each database too)"
    )
    parser.add_argument(
        "--tag",
        default=None,
        help="use var/bench/ingest-TAG.sqlite3 and schema bench_ingest_TAG instead of the default "
        "names, so two runs cannot drop each other's database",
    )
    parser.add_argument(
        "--profile-ingests",
        type=int,
        default=PROFILE_INGESTS,
        help="ingests per phase-timed run (the cProfile run takes half as many)",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        default=None,
        help="only print the Markdown of --json files (their databases side by side)",
    )
    args = parser.parse_args(argv)
    if args.tag is not None:
        Names.tagged(args.tag)
    if args.from_json is not None:
        loaded = [json.loads(p.read_text(encoding="utf-8")) for p in args.from_json]
        merged = loaded[0]
        merged["databases"] = [d for r in loaded for d in r["databases"]]
        merged["runs"] = [{k: r.get(k) for k in ("args", "finished", "code")} for r in loaded]
        print(markdown(merged))
        return
    if args.responses <= WARMUP:
        parser.error(f"--responses must be above the warm-up of {WARMUP}")
    kinds = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    results: dict[str, Any] = {
        "args": {
            "responses": args.responses,
            "patients": args.patients,
            "seed": args.seed,
            "profile_ingests": args.profile_ingests,
        },
        "python": platform.python_version(),
        "cores": os.cpu_count(),
    }
    results["code"] = common.code_version()
    common.log("scoring alone")
    results["scoring"] = scoring_alone(args.responses, args.seed)
    results["databases"] = []
    for kind in kinds:
        results["databases"].append(
            run_database(kind, args.responses, args.patients, args.seed, args.profile_ingests)
        )
        results["finished"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    print(markdown(results))


if __name__ == "__main__":
    main()
