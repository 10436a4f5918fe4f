"""Issue 6 benchmark: the burden of the adaptive Norse Feedback 2.1 form, and ``$next-question`` latency.

    python -m bench.adaptive_bench [--database sqlite|postgres|both] [--patients P] [--sessions N]
                                   [--cohort 1000] [--weeks 20] [--seed S] [--json OUT]

Prints Markdown to stdout and writes it to ``bench/adaptive-results.md``; ``--json OUT`` writes the raw
figures.

**1. Burden** (pure, no server): a simulated cohort (the model is printed with the figures) answers
weekly administrations. The rules of what is asked: the first administration (intake) asks the full
bank, every scale in full. Every later one asks all triggers (one per scale with a ``trigger``;
``subRecov`` opens on the ``subUse`` trigger), then the other items of every scale asked in full (from
``fhir_norse.adaptive``: ``scale_states(mapping, history)`` then ``scales_to_ask(mapping, states,
triggers)``), then the closing items (alliance, preferences, single, medication). Each administration's
``Measured`` per scale: the trigger in the problem direction (reverse-keyed: 8 - raw; "not relevant"
scores 1, "prefer not" is missing) and, only when the scale was asked in full, the problem-direction
mean of its items. Items asked per administration after intake: mean, p10/p50/p90, per week; the share
of the full bank; minutes under a stated seconds-per-item assumption. For comparison, what the static
form's ``enableWhen`` asks (a scale's items when this administration's trigger opens it, no memory).

**2. ``$next-question`` latency** (target p99 <= 15 ms, issue 14), over HTTP on loopback against the real
server (``fhir-norse serve`` in a process of its own: uvicorn, one worker, development mode, content pack
published, start-up objects frozen out of the garbage collector's reach as ``serve`` does), with one
sequential ``httpx`` client in this process and a ``system/*.cruds`` token, on a fresh database of its own:
``var/bench/adaptive-bench.sqlite3`` (deleted first) and the PostgreSQL schema ``bench_adaptive``
(dropped and recreated). Three groups of patients (each Patient in an active EpisodeOfCare): history
depth H = 0 (a fresh patient per session: every session is an intake), H = 5 and H = 20 (P patients
each, seeded with H completed administrations to ``nf21-adaptive|2.1.0`` a week apart, flat items:
all triggers, the items of the scales the pure state module asks, the closing items; the first is an
intake). Answers come from the cohort model. A session calls ``POST /fhir/Questionnaire/$next-question``
until ``status`` is ``completed``, answering each new page (``page-triggers``, ``page-scales``,
``page-closing``); each call is timed (``perf_counter`` around the POST, response read; building the
next body is outside the clock). After the session the completed response is stored with ``POST
/fhir/QuestionnaireResponse`` (untimed), so the history of the H = 5 and H = 20 patients grows during
the run (sessions go round-robin over the P patients; the depths actually met are reported). Every
session's ``page-scales`` is checked against what the pure state module predicts from the same history.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import cProfile
import gc
import io
import json
import math
import multiprocessing
import os
import platform
import pstats
import random
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import orjson
import sqlalchemy as sa
from fastapi import FastAPI

from bench import common
from fhir_norse.adaptive import Measured, scale_states, scales_to_ask
from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from fhir_norse.instruments.schema import InstrumentMapping, load_mapping
from fhir_norse.store import migrate
from fhir_norse.store.db import create_engine
from tests.intake_support import NF21_ADAPTIVE, questionnaire, response

Json = dict[str, Any]

RESULTS_MD = Path(__file__).resolve().parent / "adaptive-results.md"
SQLITE_FILE = common.ROOT / "var" / "bench" / "adaptive-bench.sqlite3"
PG_SCHEMA = "bench_adaptive"
AUDIENCE = "http://127.0.0.1:8097/fhir"
FHIR_JSON = "application/fhir+json"
NEXT_QUESTION = "/fhir/Questionnaire/$next-question"
TARGET_P99_MS = 15.0  # issue 14 (issue 6 had 20)
DEPTHS = (0, 5, 20)
WARMUP_SESSIONS = 5
REPLAY_SESSIONS = 3  # the last sessions of each depth group replayed in process (split, cProfile)
REPLAY_ROUNDS = 2
START = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)
PAGES = ("page-triggers", "page-scales", "page-closing")

# Seconds per item: the case study reports ~15-20 min for the first (full, 102-item) administration,
# i.e. 8.8-11.8 s per item; 10 s is the assumption used for the minutes figures.
SECONDS_PER_ITEM = 10.0
SECONDS_PER_ITEM_RANGE = (15 * 60 / 102, 20 * 60 / 102)


# ----------------------------------------------------------------------------------------- the cohort
@dataclass(frozen=True)
class CohortModel:
    """Parameters of the simulated cohort (printed with the results)."""

    general_factor: float = 0.4  # share of a scale's intake variance shared across scales (r = 0.4)
    p_improve: float = 0.55
    p_worsen: float = 0.10  # the rest stays stable
    improve_fraction: tuple[float, float] = (0.3, 0.7)  # of the distance to 1 (no problem) recovered
    worsen_by: tuple[float, float] = (0.5, 1.5)
    tau_weeks: tuple[float, float] = (4.0, 12.0)  # time constant of the course
    occasion_sd: float = 0.5  # per administration and scale
    item_sd: float = 0.7  # per item
    p_spike: float = 0.05  # per patient and week after intake: a bad week
    spike_scales: tuple[int, int] = (1, 3)
    spike_size: float = 2.0
    p_not_relevant: float = 0.01  # per clinical item
    p_prefer_not: float = 0.01

    def describe(self) -> list[str]:
        return [
            "Intake level per patient and scale (problem direction, 1-7): the scale's norm mean + norm SD "
            f"x (sqrt({self.general_factor}) x g + sqrt({1 - self.general_factor:g}) x e), g one general "
            "severity per patient, e one per scale, both standard normal (scales correlate "
            f"r = {self.general_factor}); norms: Helse Førde 2019 outpatient first assessments, from the "
            "mapping; clipped to 1-7.",
            f"Course per patient: {self.p_improve:.0%} improve (every scale moves a fraction "
            f"U{self.improve_fraction} of its distance to 1), {self.p_worsen:.0%} worsen (every scale "
            f"+U{self.worsen_by}, up to 7), the rest stay stable; exponential approach with a time "
            f"constant U{self.tau_weeks} weeks.",
            f"Answers: level + an occasion shift N(0, {self.occasion_sd}) per administration and scale + "
            f"N(0, {self.item_sd}) per item, rounded and clipped to 1-7 (reverse-keyed items answered "
            f"8 - x); {self.p_not_relevant:.0%} of clinical answers 'not relevant', "
            f"{self.p_prefer_not:.0%} 'prefer not'.",
            f"Spikes: each week after intake, with probability {self.p_spike:.0%} a bad week, "
            f"+{self.spike_size} on {self.spike_scales[0]}-{self.spike_scales[1]} random scales.",
            "Closing items: alliance around 6, preferences mostly 'as now', single and medication items "
            "uniform 1-7 (they do not change what is asked).",
        ]


SENSITIVITY: tuple[tuple[str, CohortModel], ...] = (
    ("answer noise halved (occasion SD 0.25, item SD 0.35)", CohortModel(occasion_sd=0.25, item_sd=0.35)),
    ("no spikes", CohortModel(p_spike=0.0)),
    ("80 % improve, 5 % worsen", CohortModel(p_improve=0.8, p_worsen=0.05)),
    ("improvers recover 60-90 % of the distance to 1", CohortModel(improve_fraction=(0.6, 0.9))),
    ("no general severity factor (scales independent)", CohortModel(general_factor=0.0)),
)


@cache
def nf21() -> InstrumentMapping:
    """The mapping, loaded as ``tests/adaptive/test_state.py`` loads it."""
    return load_mapping(common.ROOT / "mappings" / "nf21-2.1.0.yaml")


@dataclass(frozen=True)
class Bank:
    """The item bank's structure, counted from the mapping."""

    triggers: tuple[str, ...]  # one per scale with a trigger of its own, display order
    scale_items: dict[str, tuple[str, ...]]  # per scale, its items other than its own trigger
    closing: tuple[str, ...]
    alliance: int
    preferences: int
    single: int
    medication: int
    scale_count: int
    scale_item_count: int

    @property
    def full(self) -> int:
        return len(self.triggers) + sum(len(v) for v in self.scale_items.values()) + len(self.closing)

    def asked(self, scales: Iterable[str]) -> int:
        return len(self.triggers) + sum(len(self.scale_items[s]) for s in scales) + len(self.closing)


@cache
def bank() -> Bank:
    m = nf21()
    ordered = [m.scale(c) for c in m.display_order]
    closing = (
        *m.alliance.items,
        *(p.link_id for p in m.preferences),
        *(s.link_id for s in m.single),
        *(s.link_id for s in m.medication),
    )
    return Bank(
        triggers=tuple(s.trigger for s in ordered if s.trigger is not None),
        scale_items={s.code: tuple(i for i in s.items if i != s.trigger) for s in ordered},
        closing=tuple(closing),
        alliance=len(m.alliance.items),
        preferences=len(m.preferences),
        single=len(m.single),
        medication=len(m.medication),
        scale_count=len(m.scales),
        scale_item_count=sum(len(s.items) for s in m.scales),
    )


@dataclass
class SimPatient:
    """One simulated patient: intake level, course and answers per week (week 0 = intake)."""

    model: CohortModel
    rng: random.Random
    start: dict[str, float] = field(default_factory=dict)
    end: dict[str, float] = field(default_factory=dict)
    tau: float = 8.0
    course: str = "stable"

    @classmethod
    def draw(cls, model: CohortModel, rng: random.Random) -> SimPatient:
        m = nf21()
        p = cls(model, rng)
        g = rng.gauss(0, 1)
        draw = rng.random()
        p.course = (
            "improve"
            if draw < model.p_improve
            else "worsen"
            if draw < model.p_improve + model.p_worsen
            else "stable"
        )
        p.tau = rng.uniform(*model.tau_weeks)
        for scale in m.scales:
            z = math.sqrt(model.general_factor) * g + math.sqrt(1 - model.general_factor) * rng.gauss(0, 1)
            level = min(7.0, max(1.0, scale.norms.mean + scale.norms.sd * z))
            p.start[scale.code] = level
            if p.course == "improve":
                p.end[scale.code] = level - (level - 1) * rng.uniform(*model.improve_fraction)
            elif p.course == "worsen":
                p.end[scale.code] = min(7.0, level + rng.uniform(*model.worsen_by))
            else:
                p.end[scale.code] = level
        return p

    def level(self, scale: str, week: int) -> float:
        a, b = self.start[scale], self.end[scale]
        return b + (a - b) * math.exp(-week / self.tau)

    def answers(self, week: int) -> dict[str, str]:
        """Raw answer codes to every item of the bank (what is asked is decided elsewhere)."""
        m, model, rng = nf21(), self.model, self.rng
        spiked: set[str] = set()
        if week > 0 and rng.random() < model.p_spike:
            spiked = set(rng.sample([s.code for s in m.scales], rng.randint(*model.spike_scales)))
        out: dict[str, str] = {}
        for scale in m.scales:
            centre = self.level(scale.code, week) + rng.gauss(0, model.occasion_sd)
            if scale.code in spiked:
                centre += model.spike_size
            for link_id in scale.items:
                draw = rng.random()
                if draw < model.p_not_relevant:
                    out[link_id] = "not-relevant"
                elif draw < model.p_not_relevant + model.p_prefer_not:
                    out[link_id] = "prefer-not"
                else:
                    problem = min(7, max(1, round(centre + rng.gauss(0, model.item_sd))))
                    out[link_id] = str(8 - problem if link_id in scale.reverse_keyed else problem)
        for link_id in m.alliance.items:
            out[link_id] = str(rng.choice((4, 5, 5, 6, 6, 6, 7, 7, 7, 7)))
        for pref in m.preferences:
            out[pref.link_id] = rng.choice(("less", "as-now", "as-now", "as-now", "more"))
        for item in [*m.single, *m.medication]:
            out[item.link_id] = str(rng.randint(1, 7))
        return out


def problem_value(code: str | None, reverse: bool) -> float | None:
    """An answer in the problem direction: 'not relevant' scores 1, 'prefer not' (or none) is missing."""
    if code is None or code == "prefer-not":
        return None
    if code == "not-relevant":
        return 1.0
    raw = int(code)
    return float(8 - raw if reverse else raw)


def trigger_values(answers: Mapping[str, str]) -> dict[str, float | None]:
    """Each trigger's answer in the problem direction, by the trigger's linkId."""
    m = nf21()
    out: dict[str, float | None] = {}
    for scale in m.scales:
        if scale.trigger is not None:
            out[scale.trigger] = problem_value(
                answers.get(scale.trigger), scale.trigger in scale.reverse_keyed
            )
    return out


def measure(answers: Mapping[str, str], asked_full: Iterable[str]) -> dict[str, Measured]:
    """What one administration measured per scale (see the module doc)."""
    m = nf21()
    full = set(asked_full)
    triggers = trigger_values(answers)
    out: dict[str, Measured] = {}
    for scale in m.scales:
        score: float | None = None
        if scale.code in full:
            values = [problem_value(answers.get(i), i in scale.reverse_keyed) for i in scale.items]
            present = [v for v in values if v is not None]
            score = statistics.fmean(present) if present else None
        out[scale.code] = Measured(triggers[m.trigger_of(scale)], score)
    return out


def to_ask(history: Sequence[Mapping[str, Measured]], answers: Mapping[str, str]) -> list[str]:
    """The scales asked in full: all at intake (empty history), else what the state module says."""
    m = nf21()
    if not history:
        return list(m.display_order)
    return scales_to_ask(m, scale_states(m, history), trigger_values(answers))


def burden(model: CohortModel, patients: int, weeks: int, seed: int) -> dict[str, Any]:
    b, m = bank(), nf21()
    rng = random.Random(seed)
    per_week: dict[int, list[int]] = defaultdict(list)
    static_per_week: dict[int, list[int]] = defaultdict(list)
    after: list[int] = []
    static_after: list[int] = []
    full_share: Counter[str] = Counter()
    per_patient_mean: list[float] = []
    courses: Counter[str] = Counter()
    intake_open: list[int] = []
    t0 = time.perf_counter()
    for _ in range(patients):
        p = SimPatient.draw(model, rng)
        courses[p.course] += 1
        history: list[dict[str, Measured]] = []
        mine: list[int] = []
        for week in range(weeks):
            answers = p.answers(week)
            asked = to_ask(history, answers)
            n = b.asked(asked)
            per_week[week + 1].append(n)
            if week == 0:
                opened = scales_to_ask(m, {}, trigger_values(answers))
                intake_open.append(len(opened))
            else:
                after.append(n)
                mine.append(n)
                full_share.update(asked)
                static = b.asked(scales_to_ask(m, {}, trigger_values(answers)))
                static_after.append(static)
                static_per_week[week + 1].append(static)
            history.append(measure(answers, asked))
        if mine:
            per_patient_mean.append(statistics.fmean(mine))
    administrations_after = patients * (weeks - 1)
    return {
        "patients": patients,
        "weeks": weeks,
        "seed": seed,
        "seconds": time.perf_counter() - t0,
        "courses": dict(courses),
        "bank": {
            "full": b.full,
            "scales": b.scale_count,
            "scale_items": b.scale_item_count,
            "triggers": len(b.triggers),
            "closing": len(b.closing),
            "alliance": b.alliance,
            "preferences": b.preferences,
            "single": b.single,
            "medication": b.medication,
        },
        "intake_items": statistics.fmean(per_week[1]),
        "intake_scales_opened_by_trigger_mean": statistics.fmean(intake_open),
        "after_intake": {
            "n": len(after),
            "mean": statistics.fmean(after),
            "p10": common.quantile(after, 10),
            "p50": common.quantile(after, 50),
            "p90": common.quantile(after, 90),
            "min": min(after),
            "max": max(after),
            "share_of_full": statistics.fmean(after) / b.full,
            "patient_mean_p10": common.quantile(per_patient_mean, 10),
            "patient_mean_p90": common.quantile(per_patient_mean, 90),
        },
        "static_enablewhen_after_intake": {
            "mean": statistics.fmean(static_after),
            "p10": common.quantile(static_after, 10),
            "p50": common.quantile(static_after, 50),
            "p90": common.quantile(static_after, 90),
        },
        "per_week": {
            w: {
                "mean": statistics.fmean(v),
                "p10": common.quantile(v, 10),
                "p50": common.quantile(v, 50),
                "p90": common.quantile(v, 90),
                "static_mean": statistics.fmean(static_per_week[w]) if w in static_per_week else None,
            }
            for w, v in sorted(per_week.items())
        },
        "scale_full_share": {c: full_share[c] / administrations_after for c in m.display_order},
    }


# ----------------------------------------------------------------------------------------- HTTP
def fresh_database(kind: str) -> str:
    """A new, migrated database for this benchmark only; returns its URL."""
    if kind == "sqlite":
        SQLITE_FILE.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{SQLITE_FILE}{suffix}").unlink(missing_ok=True)
        url = f"sqlite:///{SQLITE_FILE}"
    else:
        admin = sa.create_engine(common.PG_SERVER, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")
            conn.exec_driver_sql(f"CREATE SCHEMA {PG_SCHEMA}")
        admin.dispose()
        url = f"{common.PG_SERVER}?options=-csearch_path%3D{PG_SCHEMA}"
    engine = create_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    return url


SERVER_PORT = 8097
SERVER_BASE = f"http://127.0.0.1:{SERVER_PORT}"


def build_app(url: str) -> FastAPI:
    """An app on the same database in this process: it publishes the content pack, mints the tokens
    and runs the in-process replay. The timed calls go to the real server process (:func:`serve`)."""
    settings = Settings(
        database_url=url,
        base_url=f"{SERVER_BASE}/fhir",
        mode="development",
        publish_content=True,
        log_level="WARNING",
    )
    return create_app(settings)


@contextlib.contextmanager
def serve(url: str) -> Iterator[httpx.Client]:
    """``fhir-norse serve`` in a process of its own (uvicorn, one worker, as ``make serve`` runs it),
    and an HTTP client for it: the server's heap holds the app only, not this script's data."""
    env = {
        **os.environ,
        "FHIR_NORSE_DATABASE_URL": url,
        "FHIR_NORSE_BASE_URL": f"{SERVER_BASE}/fhir",
        "FHIR_NORSE_MODE": "development",
        "FHIR_NORSE_LOG_LEVEL": "WARNING",
    }
    command = [
        sys.executable,
        "-m",
        "fhir_norse.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(SERVER_PORT),
        "--workers",
        "1",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with httpx.Client(base_url=SERVER_BASE, timeout=60) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    err = process.stderr.read().decode() if process.stderr else ""
                    raise BenchError(f"the server did not start: {err[-2000:]}")
                time.sleep(0.2)
            yield client
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def bearer(app: FastAPI) -> dict[str, str]:
    token, _jti = app.state.token_service.issue(
        subject="bench-adaptive",
        client_id="bench-adaptive",
        scope="system/*.cruds",
        audience=AUDIENCE,
        ttl=6 * 3600,
    )
    return {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON, "Accept": FHIR_JSON}


class Http:
    def __init__(self, client: httpx.Client, headers: dict[str, str]) -> None:
        self.client = client
        self.headers = headers

    def post(self, path: str, body: Json, expect: int = 201) -> Json:
        answer = self.client.post(path, content=orjson.dumps(body), headers=self.headers)
        if answer.status_code != expect:
            raise BenchError(f"POST {path}: {answer.status_code} {answer.text[:1500]}")
        result: Json = answer.json()
        return result


class BenchError(Exception):
    pass


def create_patients(http: Http, n: int, tag: str) -> list[str]:
    clinician = http.post(
        "/fhir/Practitioner", {"resourceType": "Practitioner", "name": [{"family": f"Lege {tag}"}]}
    )
    ids: list[str] = []
    for i in range(n):
        patient = http.post(
            "/fhir/Patient",
            {
                "resourceType": "Patient",
                "identifier": [{"system": "urn:oid:2.16.578.1.12.4.1.4.1", "value": f"{tag}{i:08d}"}],
                "name": [{"family": f"Pasient{tag}{i}", "given": ["Bench"]}],
                "gender": "female" if i % 2 else "male",
                "birthDate": f"{1950 + i % 50}-0{1 + i % 9}-1{i % 10}",
            },
        )
        http.post(
            "/fhir/EpisodeOfCare",
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


@cache
def answer_codings() -> dict[str, dict[str, Json]]:
    """linkId -> answer code -> valueCoding, from the published adaptive Questionnaire."""
    out: dict[str, dict[str, Json]] = {}

    def walk(items: list[Json]) -> None:
        for item in items:
            options = {}
            for option in item.get("answerOption", []):
                coding = option.get("valueCoding")
                if coding:
                    options[str(coding["code"])] = {k: coding[k] for k in ("system", "code") if k in coding}
            if options:
                out[str(item["linkId"])] = options
            walk(item.get("item", []))

    walk(questionnaire(NF21_ADAPTIVE)["item"])
    return out


@dataclass
class BenchPatient:
    """A patient of the latency run: its cohort model and the history as the client sees it."""

    id: str
    sim: SimPatient
    depth_group: int
    history: list[dict[str, Measured]] = field(default_factory=list)

    @property
    def week(self) -> int:
        return len(self.history)


def seed_history(http: Http, patient: BenchPatient, depth: int) -> None:
    """``depth`` completed administrations, flat items, a week apart (the first an intake)."""
    b = bank()
    for _ in range(depth):
        answers = patient.sim.answers(patient.week)
        asked = to_ask(patient.history, answers)
        keep = set(b.triggers) | set(b.closing) | {i for s in asked for i in b.scale_items[s]}
        authored = START + timedelta(weeks=patient.week, minutes=patient.sim.rng.randint(0, 600))
        body = response(
            NF21_ADAPTIVE,
            {k: v for k, v in answers.items() if k in keep},
            patient=patient.id,
            authored=authored.isoformat(timespec="seconds"),
        )
        http.post("/fhir/QuestionnaireResponse", body)
        patient.history.append(measure(answers, asked))


def session_request(patient: BenchPatient, authored: datetime) -> Json:
    """The first ``$next-question`` request: no page and no answer yet. The brief's ``"item": []`` on
    the response and the contained Questionnaire is left out: R4 JSON forbids empty arrays and the
    server refuses them."""
    return {
        "resourceType": "QuestionnaireResponse",
        "status": "in-progress",
        "subject": {"reference": f"Patient/{patient.id}"},
        "authored": authored.isoformat(timespec="seconds"),
        "questionnaire": "#q",
        "contained": [
            {
                "resourceType": "Questionnaire",
                "id": "q",
                "status": "active",
                "derivedFrom": [NF21_ADAPTIVE],
            }
        ],
    }


def leaf_link_ids(items: list[Json]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item.get("type") == "group" or ("item" in item and "answerOption" not in item):
            out += leaf_link_ids(item.get("item", []))
        else:
            out.append(str(item["linkId"]))
    return out


@dataclass
class CallSample:
    seconds: float
    call: int  # 1-based within the session
    returned: str  # the page the call added, or "completed"
    depth: int  # stored administrations of the patient at the session
    group: int


@dataclass
class SessionLog:
    samples: list[CallSample] = field(default_factory=list)
    sessions: int = 0
    items_asked: list[int] = field(default_factory=list)
    items_by_depth0: list[int] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    page_sequences: Counter[str] = field(default_factory=Counter)
    store_path: Counter[str] = field(default_factory=Counter)
    request_bytes: list[int] = field(default_factory=list)
    bodies: list[tuple[int, bytes]] = field(default_factory=list)  # (call, request) of the last sessions


def run_session(http: Http, patient: BenchPatient, log_: SessionLog | None, max_calls: int = 8) -> None:
    """One adaptive session to completion, then the completed response stored (untimed)."""
    m, b = nf21(), bank()
    answers = patient.sim.answers(patient.week)
    authored = START + timedelta(weeks=patient.week, minutes=patient.sim.rng.randint(0, 600))
    body = session_request(patient, authored)
    mine: list[Json] = []
    asked_items: list[str] = []
    pages: list[str] = []
    scale_page_items: list[str] = []
    depth = patient.week
    codings = answer_codings()
    returned: Json = {}
    for call in range(1, max_calls + 1):
        content = orjson.dumps(body)
        # The client's own garbage collector stays out of the timed window (as timeit does): this
        # process holds the cohort and every session body, and a full collection of that heap took
        # 50-150 ms, which the server never saw. The response is read in full inside the window.
        gc.disable()
        t0 = time.perf_counter()
        answer = http.client.post(NEXT_QUESTION, content=content, headers=http.headers)
        seconds = time.perf_counter() - t0
        gc.enable()
        returned = orjson.loads(answer.content)
        if answer.status_code != 200:
            raise BenchError(f"$next-question call {call}: {answer.status_code} {answer.text[:1500]}")
        if returned.get("status") == "completed":
            page = "completed"
        else:
            contained = next(
                (c for c in returned.get("contained", []) if c.get("resourceType") == "Questionnaire"), None
            )
            if contained is None or len(contained.get("item", [])) <= len(pages):
                raise BenchError(f"$next-question call {call}: neither a new page nor completed")
            new = contained["item"][len(pages)]
            page = str(new["linkId"])
            link_ids = leaf_link_ids(new.get("item", []))
            group: list[Json] = []
            for link_id in link_ids:
                code = answers.get(link_id)
                if code is None:
                    raise BenchError(f"page {page}: unknown item {link_id}")
                group.append({"linkId": link_id, "answer": [{"valueCoding": codings[link_id][code]}]})
            mine.append({"linkId": page, "item": group})
            asked_items += link_ids
            pages.append(page)
            if page == "page-scales":
                scale_page_items = link_ids
        if log_ is not None:
            log_.samples.append(CallSample(seconds, call, page, depth, patient.depth_group))
            log_.request_bytes.append(len(content))
            log_.bodies = [*log_.bodies[-(REPLAY_SESSIONS * 4 - 1) :], (call, content)]
        if page == "completed":
            break
        body = {**returned, "item": mine}
    else:
        raise BenchError(f"session did not complete in {max_calls} calls")
    # What the server asked against what the pure state module says, from the same history.
    predicted = to_ask(patient.history, answers)
    got = sorted({m.scale_of_item(i).code for i in scale_page_items}, key=m.display_order.index)
    expected_items = {i for s in predicted for i in b.scale_items[s]}
    if set(scale_page_items) != expected_items and log_ is not None and len(log_.mismatches) < 20:
        log_.mismatches.append(
            f"patient {patient.id} depth {depth}: server asked {got}, state module predicts {predicted}"
        )
    # Store the completed response (untimed); fall back to a flat canonical response if refused.
    done = {
        **returned,
        "item": mine,
        "status": "completed",
        "authored": authored.isoformat(timespec="seconds"),
    }
    try:
        http.post("/fhir/QuestionnaireResponse", done)
        path = "completed $next-question response"
    except BenchError:
        flat = response(
            NF21_ADAPTIVE,
            {k: answers[k] for k in asked_items},
            patient=patient.id,
            authored=authored.isoformat(timespec="seconds"),
        )
        http.post("/fhir/QuestionnaireResponse", flat)
        path = "refused; stored as a flat nf21-adaptive response instead"
    patient.history.append(measure(answers, got))
    if log_ is not None:
        log_.sessions += 1
        log_.items_asked.append(len(asked_items))
        if depth == 0:
            log_.items_by_depth0.append(len(asked_items))
        log_.page_sequences[" > ".join(pages) + " > completed"] += 1
        log_.store_path[path] += 1


# Functions whose cumulative time the in-process split reports: (label, file fragment, function name).
SPLIT = (
    ("resource validation (validate_resource)", "server/validation", "validate_resource"),
    ("response validation (validate_response)", "instruments/intake", "validate_response"),
    ("patient state (history search + scale_states)", "rom/patient", "patient_state"),
    ("contained form checks (_contained)", "rom/adaptive", "_contained"),
    ("next page (next_page)", "adaptive/forms", "next_page"),
    ("copy.deepcopy", "copy", "deepcopy"),
    ("audit: build (audit_event)", "auth/audit", "event"),
    ("audit: store (record_now)", "server/interactions", "record_now"),
)


def in_process(
    app: FastAPI, bodies: Sequence[tuple[int, bytes]], rounds: int = REPLAY_ROUNDS
) -> dict[str, Any]:
    """``$next-question`` called in process (no HTTP, no JSON) on recorded request bodies: time per
    call, and a cProfile of the same calls (cumulative time of the functions in ``SPLIT``, and the top
    functions by own time)."""
    try:
        from fhir_norse.auth.caller import Caller
        from fhir_norse.server.context import RequestContext
        from fhir_norse.server.operations.registry import OperationCall
    except ImportError as exc:  # the server moved things: no split, the HTTP figures stand
        return {"error": str(exc)}
    service = app.state.service

    def next_question_operation(service: Any, ctx: Any, body: Any) -> Any:
        """``POST Questionnaire/$next-question`` as the route invokes it (the operation registry)."""
        call = OperationCall(ctx, "Questionnaire", body=body)
        return service.invoke(call, "next-question", method="POST")

    ctx = RequestContext(
        caller=Caller(client_id="bench-adaptive", scopes=frozenset({"system/*.cruds"}), token_id="bench"),
        base_url=AUDIENCE,
        source_address="127.0.0.1",
        request_id="bench",
    )
    parsed = [(call, orjson.loads(b)) for call, b in bodies]
    per_call: dict[int, list[float]] = defaultdict(list)
    for _ in range(rounds):
        for call, body in [(c, copy.deepcopy(b)) for c, b in parsed]:  # the server may change it
            t0 = time.perf_counter()
            next_question_operation(service, ctx, body)
            per_call[call].append(time.perf_counter() - t0)
    # SQL statements per call (on the engine the operation runs on), one more round.
    engine = service.storage.engine
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement.split(None, 1)[0].upper() if statement.strip() else "")

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        for _call, body in [(c, copy.deepcopy(b)) for c, b in parsed]:
            next_question_operation(service, ctx, body)
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    copies = [(call, copy.deepcopy(body)) for call, body in parsed]
    profile = cProfile.Profile()
    profile.enable()
    for _call, body in copies:
        next_question_operation(service, ctx, body)
    profile.disable()
    stats = pstats.Stats(profile)
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    total = sum(t[2] for t in raw.values())
    split: dict[str, float] = {}
    for label, fragment, name in SPLIT:
        split[label] = sum(v[3] for (f, _l, fn), v in raw.items() if fn == name and fragment in f) / len(
            copies
        )
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(20)
    root = str(common.ROOT) + "/"
    text = out.getvalue().replace(root + ".venv/lib/python3.11/site-packages/", "").replace(root, "")
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("ncalls")), 0)
    return {
        "calls": len(parsed),
        "by_call": {str(c): common.stats_ms(v) for c, v in sorted(per_call.items())},
        "all": common.stats_ms([x for v in per_call.values() for x in v]),
        "profiled_ms_per_call": total / len(copies) * 1000,
        "statements_per_call": len(statements) / max(1, len(parsed)),
        "statements_by_kind": dict(Counter(statements)),
        "split_ms_per_call": {k: v * 1000 for k, v in split.items()},
        "top": "\n".join(lines[start:]).rstrip(),
    }


def endpoint_present() -> bool:
    """Whether this working tree serves ``$next-question``: an operation module of its own since issue
    11 (the routes come from the operation registry), a route of its own before."""
    if (common.ROOT / "fhir_norse" / "rom" / "operations" / "next_question.py").exists():
        return True
    routes = common.ROOT / "fhir_norse" / "api" / "routes.py"
    return routes.exists() and "next-question" in routes.read_text(encoding="utf-8")


def database_info(engine: sa.Engine) -> dict[str, Any]:
    info: dict[str, Any] = {"dialect": engine.dialect.name}
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            info["journal_mode"] = conn.exec_driver_sql("PRAGMA journal_mode").scalar_one()
            info["synchronous"] = conn.exec_driver_sql("PRAGMA synchronous").scalar_one()
        else:
            info["version"] = conn.exec_driver_sql("SHOW server_version").scalar_one()
    return info


def analyze(engine: sa.Engine) -> float:
    """ANALYZE every table of the benchmark's schema (as autovacuum would); seconds taken."""
    t0 = time.perf_counter()
    with engine.begin() as conn:
        tables = conn.exec_driver_sql(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        ).scalars()
        for table in list(tables):
            conn.exec_driver_sql(f'ANALYZE "{table}"')
    return time.perf_counter() - t0


def run_database(kind: str, patients: int, sessions: int, seed: int) -> dict[str, Any]:
    label = "SQLite" if kind == "sqlite" else "PostgreSQL"
    common.log(f"[{label}] fresh database")
    url = fresh_database(kind)
    app = build_app(url)
    result: dict[str, Any] = {"database": label, "db": database_info(app.state.service.storage.engine)}
    rng = random.Random(seed)
    model = CohortModel()
    with serve(url) as client:
        http = Http(client, bearer(app))
        groups: dict[int, list[BenchPatient]] = {}
        t0 = time.perf_counter()
        for depth in DEPTHS:
            count = sessions + WARMUP_SESSIONS if depth == 0 else patients
            ids = create_patients(http, count, f"H{depth}")
            groups[depth] = [BenchPatient(i, SimPatient.draw(model, rng), depth) for i in ids]
            common.log(f"[{label}] H={depth}: {count} patients, seeding {depth} administrations each")
            for p in groups[depth]:
                seed_history(http, p, depth)
        result["seed_s"] = time.perf_counter() - t0
        if kind == "postgres":
            # This machine's PostgreSQL runs without autovacuum; a production one analyzes a table
            # after this much writing. Without statistics the subject lookup takes a worse index
            # (5.5 ms instead of 2.9 ms for 830 Observations, EXPLAIN ANALYZE; see BENCHMARKS.md).
            result["analyze_s"] = analyze(app.state.service.storage.engine)
        health: list[float] = []
        for _ in range(200):
            h0 = time.perf_counter()
            client.get("/health")
            health.append(time.perf_counter() - h0)
        result["health"] = common.stats_ms(health[20:])
        # Warm-up: a few intake sessions, not counted.
        for p in groups[0][:WARMUP_SESSIONS]:
            run_session(http, p, None)
        fresh = groups[0][WARMUP_SESSIONS:]
        # Sessions interleaved over the depth groups so that they share the database's growth.
        logs = {d: SessionLog() for d in DEPTHS}
        common.log(f"[{label}] {sessions} sessions per depth group")
        load_before = os.getloadavg()
        t1 = time.perf_counter()
        for k in range(sessions):
            run_session(http, fresh[k], logs[0])
            for depth in DEPTHS[1:]:
                group = groups[depth]
                run_session(http, group[k % len(group)], logs[depth])
        result["sessions_s"] = time.perf_counter() - t1
        result["loadavg"] = [load_before, os.getloadavg()]
        common.log(f"[{label}] in process: the last {REPLAY_SESSIONS} sessions of each group replayed")
        result["in_process"] = in_process(app, [b for d in DEPTHS for b in logs[d].bodies])
    samples = [s for d in DEPTHS for s in logs[d].samples]
    result["calls"] = common.stats_ms([s.seconds for s in samples])
    result["by_call"] = {
        str(c): common.stats_ms([s.seconds for s in samples if s.call == c])
        for c in sorted({s.call for s in samples})
    }
    result["by_page"] = {
        page: common.stats_ms([s.seconds for s in samples if s.returned == page])
        for page in (*PAGES, "completed")
        if any(s.returned == page for s in samples)
    }
    result["by_depth"] = {
        str(d): {
            **common.stats_ms([s.seconds for s in logs[d].samples]),
            "sessions": logs[d].sessions,
            "depth_range": [min(s.depth for s in logs[d].samples), max(s.depth for s in logs[d].samples)],
            "calls_per_session": len(logs[d].samples) / max(1, logs[d].sessions),
            "items_per_session": statistics.fmean(logs[d].items_asked) if logs[d].items_asked else None,
            "request_kb_mean": statistics.fmean(logs[d].request_bytes) / 1000,
            "page_sequences": dict(logs[d].page_sequences),
            "store": dict(logs[d].store_path),
        }
        for d in DEPTHS
    }
    result["by_depth_call"] = {
        f"{d}/{c}": common.stats_ms([s.seconds for s in logs[d].samples if s.call == c])
        for d in DEPTHS
        for c in sorted({s.call for s in logs[d].samples})
    }
    result["mismatches"] = [x for d in DEPTHS for x in logs[d].mismatches]
    result["mismatch_sessions"] = sum(len(logs[d].mismatches) for d in DEPTHS)
    result["target_met"] = result["calls"]["p99"] <= TARGET_P99_MS
    return result


# ----------------------------------------------------------------------------------------- Markdown
def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{float(x):,.{digits}f}"


def _stats_row(name: str, s: Mapping[str, Any]) -> str:
    return (
        f"| {name} | {_f(s.get('n'))} | {_f(s.get('p50'))} | {_f(s.get('p95'))} | {_f(s.get('p99'))} | "
        f"{_f(s.get('max'))} | {_f(s.get('mean'))} |"
    )


def markdown(results: Mapping[str, Any]) -> str:
    lines: list[str] = []
    w = lines.append
    bu = results["burden"]
    bk = bu["bank"]
    a = bu["after_intake"]
    w("## Adaptive form (issue 6): `python -m bench.adaptive_bench`")
    w("")
    w(
        f"Run {results['finished']} (UTC), Python {results['python']}, {results['cores']} cores, "
        f"`{results['command']}`; code at commit {results['code']['commit']} ({results['code']['subject']})"
        + (
            f"; server files changed in the working tree: {', '.join(results['code']['changed'])}"
            if results["code"]["changed"]
            else ""
        )
        + "."
    )
    w("")
    w("### 1. Burden: items asked per administration")
    w("")
    w(
        f"The bank, counted from `mappings/nf21-2.1.0.yaml`: **{bk['full']} items** = {bk['scale_items']} "
        f"items of {bk['scales']} clinical scales ({bk['triggers']} of them triggers; `subRecov` opens on "
        f"the `subUse` trigger) + {bk['closing']} closing items ({bk['alliance']} alliance, "
        f"{bk['preferences']} preferences, {bk['single']} single, {bk['medication']} medication). After "
        f"intake every administration asks the {bk['triggers']} triggers and the {bk['closing']} closing "
        f"items, so the floor is {bk['triggers'] + bk['closing']} items; the intake asks all {bk['full']}."
    )
    w("")
    w(
        f"Simulated cohort: {bu['patients']:,} patients x {bu['weeks']} weekly administrations (week 1 = "
        f"intake), seed {bu['seed']}; courses drawn: "
        + ", ".join(f"{v} {k}" for k, v in sorted(bu["courses"].items()))
        + "."
    )
    w("")
    for line in results["cohort_model"]:
        w(f"- {line}")
    w("")
    minutes = SECONDS_PER_ITEM / 60
    w("| Measure | Items | Share of the full bank | Minutes (assumption: 10 s per item) |")
    w("|---|---|---|---|")
    w(f"| Full bank | {bk['full']} | 100 % | {_f(bk['full'] * minutes, 1)} |")
    w(f"| Intake (week 1) | {_f(bu['intake_items'], 1)} | 100 % | {_f(bu['intake_items'] * minutes, 1)} |")
    w(
        f"| **After intake, mean** (n = {a['n']:,} administrations) | **{_f(a['mean'], 1)}** | "
        f"**{_f(a['share_of_full'] * 100, 0)} %** | **{_f(a['mean'] * minutes, 1)}** |"
    )
    for q in ("p10", "p50", "p90"):
        w(f"| After intake, {q} | {a[q]} | {_f(a[q] / bk['full'] * 100, 0)} % | {_f(a[q] * minutes, 1)} |")
    w(f"| After intake, min / max | {a['min']} / {a['max']} | | |")
    w(
        f"| After intake, per-patient mean, p10 / p90 over patients | {_f(a['patient_mean_p10'], 1)} / "
        f"{_f(a['patient_mean_p90'], 1)} | | |"
    )
    st = bu["static_enablewhen_after_intake"]
    w(
        f"| For comparison: static form's `enableWhen` (this week's trigger only, no memory), mean "
        f"(p10 / p50 / p90) | {_f(st['mean'], 1)} ({st['p10']} / {st['p50']} / {st['p90']}) | "
        f"{_f(st['mean'] / bk['full'] * 100, 0)} % | {_f(st['mean'] * minutes, 1)} |"
    )
    w("")
    lo, hi = SECONDS_PER_ITEM_RANGE
    w(
        f"*Minutes are an assumption, not a measurement*: {SECONDS_PER_ITEM:g} s per item, taken from the "
        f"case study's ~15-20 min for a first (full, {bk['full']}-item) administration = {lo:.1f}-{hi:.1f} s "
        f"per item. At that rate the after-intake mean is {_f(a['mean'] * lo / 60, 1)}-"
        f"{_f(a['mean'] * hi / 60, 1)} min (the case study says ~5 min later on). Items are not equally "
        "long, and later administrations are probably faster per item (familiar wording)."
    )
    w("")
    w("Per week (items asked; week 1 = intake):")
    w("")
    w("| Week | mean | p10 | p50 | p90 | static `enableWhen` mean |")
    w("|---|---|---|---|---|---|")
    for wk in (1, 2, 5, 10, 20):
        row = bu["per_week"].get(wk) or bu["per_week"].get(str(wk))
        if row:
            w(
                f"| {wk} | {_f(row['mean'], 1)} | {row['p10']} | {row['p50']} | {row['p90']} | "
                f"{_f(row['static_mean'], 1)} |"
            )
    w("")
    w("<details><summary>Every week, and how often each scale is asked in full after intake</summary>")
    w("")
    w("| Week | mean items |")
    w("|---|---|")
    for wk, row in bu["per_week"].items():
        w(f"| {wk} | {_f(row['mean'], 1)} |")
    w("")
    w("| Scale | share of administrations after intake asked in full |")
    w("|---|---|")
    for code, share in bu["scale_full_share"].items():
        w(f"| {code} | {_f(share * 100, 1)} % |")
    w("")
    w("</details>")
    w("")
    w(f"Simulation time: {_f(bu['seconds'], 1)} s per cohort (pure, in process).")
    w("")
    w(
        "Sensitivity: the same cohort (same seed) with one parameter of the model changed; items asked "
        "after intake."
    )
    w("")
    w("| Cohort model | mean | p10 | p50 | p90 | last week mean | static `enableWhen` mean |")
    w("|---|---|---|---|---|---|---|")
    base = {"variant": "as above", "after_intake": a, "static": st, "last_week": bu["per_week"][bu["weeks"]]}
    for v in [base, *results.get("sensitivity", [])]:
        x = v["after_intake"]
        w(
            f"| {v['variant']} | {_f(x['mean'], 1)} | {x['p10']} | {x['p50']} | {x['p90']} | "
            f"{_f(v['last_week']['mean'], 1)} | {_f(v['static']['mean'], 1)} |"
        )
    w("")
    w("### 2. `$next-question` latency")
    w("")
    dbs = results.get("databases", [])
    if results.get("latency_skipped"):
        w(f"**Not measured**: {results['latency_skipped']}")
        w("")
        return "\n".join(lines)
    args = results["args"]
    w(
        "One sequential `httpx` client (`system/*.cruds` token) over loopback HTTP against "
        "`fhir-norse serve` in a process of its own (uvicorn, one worker, development mode, content pack "
        "published), a fresh database each."
        f" Depth groups: H = 0 ({args['sessions']} fresh patients, every session an intake), H = 5 and "
        f"H = 20 ({args['patients']} patients each, seeded with H stored completed administrations a week "
        f"apart); {args['sessions']} sessions per group, interleaved, round-robin over the group's "
        f"patients, each completed response stored afterwards (untimed), so the depth grows during the run; "
        f"{WARMUP_SESSIONS} warm-up intake sessions before, not counted. Latency per `$next-question` call "
        "in ms (nearest rank), response read."
    )
    w("")
    w("| Measure | Target | " + " | ".join(f"{d['database']} ms | " for d in dbs) + " |")
    w("|---|---|" + "---|---|" * len(dbs))
    if dbs:
        cells = []
        for d in dbs:
            if "error" in d:
                cells.append(f"error | {d['error'][:200]}")
            else:
                cells.append(f"{_f(d['calls']['p99'])} | **{'met' if d['target_met'] else 'not met'}**")
        w(f"| `$next-question` p99, all calls | ≤ {TARGET_P99_MS:g} ms | " + " | ".join(cells) + " |")
    w("")
    for d in dbs:
        if "error" in d:
            w(f"**{d['database']}: failed**: `{d['error']}`")
            w("")
            continue
        w(
            f"#### {d['database']} ({', '.join(f'{k} {v}' for k, v in d['db'].items() if k != 'dialect')}): "
            f"seeding {_f(d['seed_s'], 0)} s"
            + (f", then ANALYZE of the schema ({_f(d['analyze_s'], 1)} s)" if "analyze_s" in d else "")
            + f", sessions {_f(d['sessions_s'], 0)} s; load average "
            f"{_f(d['loadavg'][0][0])} before, {_f(d['loadavg'][1][0])} after"
        )
        w("")
        w("| Calls | n | p50 | p95 | p99 | max | mean |")
        w("|---|---|---|---|---|---|---|")
        w(_stats_row("**all `$next-question` calls**", d["calls"]))
        for c, s in d["by_call"].items():
            w(_stats_row(f"call {c}", s))
        for page, s in d["by_page"].items():
            w(_stats_row(f"calls that returned {page}", s))
        for depth, s in d["by_depth"].items():
            lo_d, hi_d = s["depth_range"]
            w(_stats_row(f"H = {depth} (stored history {lo_d}-{hi_d} at the session)", s))
        w(_stats_row("`GET /health` (the floor of any request)", d["health"]))
        w("")
        w("| Depth group | sessions | calls / session | items asked / session | request kB (mean) | pages |")
        w("|---|---|---|---|---|---|")
        for depth, s in d["by_depth"].items():
            seqs = "; ".join(f"{k}: {v}" for k, v in s["page_sequences"].items())
            w(
                f"| H = {depth} | {s['sessions']} | {_f(s['calls_per_session'], 2)} | "
                f"{_f(s['items_per_session'], 1)} | {_f(s['request_kb_mean'], 1)} | {seqs} |"
            )
        w("")
        w("<details><summary>By depth group and call number</summary>")
        w("")
        w("| Depth / call | n | p50 | p95 | p99 | max | mean |")
        w("|---|---|---|---|---|---|---|")
        for key, s in d["by_depth_call"].items():
            w(_stats_row(key, s))
        w("")
        w("</details>")
        w("")
        ip = d.get("in_process") or {}
        if "error" in ip:
            w(f"In-process split not measured: {ip['error']}")
            w("")
        elif ip:
            w(
                f"In process (the operation called directly: no HTTP, no JSON parse or render), the last "
                f"{REPLAY_SESSIONS} sessions of each group replayed ({ip['calls']} calls x "
                f"{REPLAY_ROUNDS}): mean "
                f"{_f(ip['all']['mean'])} ms per call against {_f(d['calls']['mean'])} ms over HTTP; by call "
                "number: "
                + ", ".join(f"{c}: {_f(v['mean'])}" for c, v in ip["by_call"].items())
                + " ms. Cumulative time of some functions under cProfile (ms per call; they nest, the "
                f"profiler slows everything, {_f(ip['profiled_ms_per_call'])} ms per call profiled); "
                f"SQL statements per call: {_f(ip.get('statements_per_call'), 1)} ("
                + ", ".join(f"{k} {v}" for k, v in sorted((ip.get("statements_by_kind") or {}).items()))
                + " in all):"
            )
            w("")
            w("| Function (cumulative) | ms per call |")
            w("|---|---|")
            for k, v in ip["split_ms_per_call"].items():
                w(f"| {k} | {_f(v)} |")
            w("")
            w(f"<details><summary>cProfile, {d['database']}: top functions by own time</summary>")
            w("")
            w("```")
            w(ip["top"])
            w("```")
            w("</details>")
            w("")
        stores = Counter[str]()
        for s in d["by_depth"].values():
            stores.update(s["store"])
        w("Completed responses stored: " + "; ".join(f"{k}: {v}" for k, v in stores.items()) + ".")
        w("")
        if d["mismatch_sessions"]:
            w(
                f"**{d['mismatch_sessions']} session(s) where the server's `page-scales` differs from the "
                "pure state module's prediction** (first ones):"
            )
            w("")
            for x in d["mismatches"][:8]:
                w(f"- {x}")
        else:
            w("Every session's `page-scales` matched the pure state module's prediction (same history).")
        w("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--patients", type=int, default=8, help="patients per depth group H = 5 and H = 20")
    parser.add_argument("--sessions", type=int, default=24, help="timed sessions per depth group")
    parser.add_argument("--cohort", type=int, default=1000, help="simulated patients for the burden")
    parser.add_argument("--weeks", type=int, default=20, help="weekly administrations per simulated patient")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None, help="write the raw figures here")
    args = parser.parse_args(argv)
    if args.patients < 1 or args.sessions < 1 or args.cohort < 1 or args.weeks < 2:
        parser.error("--patients, --sessions and --cohort must be >= 1, --weeks >= 2")
    model = CohortModel()
    results: dict[str, Any] = {
        "command": " ".join(
            ["python -m bench.adaptive_bench", *(argv if argv is not None else sys.argv[1:])]
        ),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "code": common.code_version(),
        "cohort_model": model.describe(),
    }
    common.log(f"burden: {args.cohort} patients x {args.weeks} weeks")
    results["burden"] = burden(model, args.cohort, args.weeks, args.seed)
    results["sensitivity"] = []
    for name, variant in SENSITIVITY:
        common.log(f"burden, sensitivity: {name}")
        run = burden(variant, args.cohort, args.weeks, args.seed)
        results["sensitivity"].append(
            {
                "variant": name,
                "after_intake": run["after_intake"],
                "static": run["static_enablewhen_after_intake"],
                "last_week": run["per_week"][args.weeks],
            }
        )
    results["databases"] = []
    if not endpoint_present():
        results["latency_skipped"] = "`$next-question` is not served by this working tree (not there yet)."
    else:
        kinds = ["sqlite", "postgres"] if args.database == "both" else [args.database]
        for kind in kinds:
            try:
                # Each database in a fresh process of its own: the client's heap (the cohort above, the
                # other database's sessions) stays out of the measurement, and so does the order.
                spawn = multiprocessing.get_context("spawn")
                with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                    future = pool.submit(run_database, kind, args.patients, args.sessions, args.seed)
                    results["databases"].append(future.result())
            except BenchError as exc:
                common.log(f"{kind}: {exc}")
                results["databases"].append(
                    {"database": "SQLite" if kind == "sqlite" else "PostgreSQL", "error": str(exc)}
                )
    results["finished"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    text = markdown(results)
    RESULTS_MD.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
