"""``fhir-norse calibrate`` against a real database (SQLite and PostgreSQL).

The database holds 42 completed NF 2.1 responses (14 patients x 3 administrations, one of them amended)
generated with a seeded ``random.Random``: a latent level per patient and scale, a shift per
administration and noise per item, so that the items of a scale correlate; answers 1-7 with a few
"not-relevant" and "prefer-not", reverse-keyed items written as ``8 - x``, scale items answered only
where the static Questionnaire's ``enableWhen`` opens them. An in-progress, a stopped and a deleted
response (all with extreme answers) must not count. The expected alphas are computed here, without
the project's calibration code.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from fhir_norse.auth.caller import Caller
from fhir_norse.cli import main
from fhir_norse.cli.calibrate import counts_response, next_patch_version
from fhir_norse.compose import build_service
from fhir_norse.config import Settings
from fhir_norse.instruments.intake import validate_response
from fhir_norse.instruments.registry import InstrumentRegistry
from fhir_norse.instruments.schema import InstrumentMapping, Scale, load_mapping
from fhir_norse.server.content import publish_content
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from fhir_norse.store.tables import INDEX_TABLES, HistoryRow, ResourceRow
from tools.content_check import main as content_check

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "mappings" / "nf21-2.1.0.yaml"
STATIC = "http://fhir-norse.org/fhir/Questionnaire/nf21-static"
ADAPTIVE = "http://fhir-norse.org/fhir/Questionnaire/nf21-adaptive"
CANONICAL = f"{STATIC}|2.1.0"
PATIENTS = 14
ADMINISTRATIONS = 3
COUNTED = PATIENTS * ADMINISTRATIONS
MIN_COMPLETE = 10
# Scales whose triggers rarely open them in this sample (subRecov opens on the subUse trigger).
RARE = frozenset({"suicide", "subUse", "eating"})
NOT_RELEVANT, PREFER_NOT = "not-relevant", "prefer-not"

Json = dict[str, Any]
Answers = dict[str, str]


@cache
def nf21() -> InstrumentMapping:
    return load_mapping(SOURCE)


@cache
def static_questionnaire() -> Json:
    path = ROOT / "questionnaires" / "nf21" / "Questionnaire-nf21-static.json"
    data: Json = json.loads(path.read_text(encoding="utf-8"))
    return data


def _questions(items: list[Json]) -> Iterator[Json]:
    for item in items:
        if item.get("type") not in ("group", "display"):
            yield item
        yield from _questions(item.get("item", []))


# --- the data ------------------------------------------------------------------------------------


class Generator:
    """Answer sets of simulated patients and the valid QuestionnaireResponses that carry them."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.options = {
            q["linkId"]: {o["valueCoding"]["code"]: o["valueCoding"] for o in q.get("answerOption", [])}
            for q in _questions(static_questionnaire()["item"])
        }
        self.scale_of = {i: s for s in nf21().scales for i in s.items}

    def patient(self) -> dict[str, float]:
        """Latent problem level (1-7 scale) per scale code."""
        severity = self.rng.gauss(0, 1)
        return {
            s.code: (1.8 if s.code in RARE else 4.8) + 0.8 * severity + self.rng.gauss(0, 1.2)
            for s in nf21().scales
        }

    def administration(self, levels: dict[str, float], extreme: bool = False) -> Answers:
        """An answer to every question (scale items in the problem direction around the level)."""
        shift = {code: self.rng.gauss(0, 0.5) for code in levels}
        answers: Answers = {}
        for link_id, codes in self.options.items():
            scale = self.scale_of.get(link_id)
            if scale is None:
                numeric = [c for c in codes if c.isdigit()] or [
                    c for c in codes if c not in (NOT_RELEVANT, PREFER_NOT)
                ]
                answers[link_id] = self.rng.choice(numeric)
                continue
            special = self.rng.random()
            if not extreme and special < 0.04:
                answers[link_id] = NOT_RELEVANT
            elif not extreme and special < 0.07:
                answers[link_id] = PREFER_NOT
            else:
                problem = (
                    7 if extreme else round(levels[scale.code] + shift[scale.code] + self.rng.gauss(0, 0.6))
                )
                value = min(7, max(1, problem))
                answers[link_id] = str(8 - value if link_id in scale.reverse_keyed else value)
        return answers

    def response(self, answers: Answers, patient: str, authored: date, status: str) -> tuple[Json, Answers]:
        """The response with the answers the static form shows; and those answers (linkId -> code)."""
        given: Answers = {}

        def enabled(item: Json) -> bool:
            conditions = item.get("enableWhen", [])
            assert all(c["operator"] == "=" for c in conditions)
            assert len(conditions) < 2 or item.get("enableBehavior") == "any"
            return not conditions or any(
                given.get(c["question"]) == c["answerCoding"]["code"] for c in conditions
            )

        def build(items: list[Json]) -> list[Json]:
            out: list[Json] = []
            for item in items:
                if item.get("type") == "display" or not enabled(item):
                    continue
                if item.get("type") == "group":
                    children = build(item.get("item", []))
                    if children:
                        out.append({"linkId": item["linkId"], "item": children})
                    continue
                code = answers[item["linkId"]]
                given[item["linkId"]] = code
                coding = {k: v for k, v in self.options[item["linkId"]][code].items() if k != "extension"}
                out.append({"linkId": item["linkId"], "answer": [{"valueCoding": coding}]})
            return out

        body = {
            "resourceType": "QuestionnaireResponse",
            "questionnaire": CANONICAL,
            "status": status,
            "subject": {"reference": f"Patient/{patient}"},
            "authored": f"{authored.isoformat()}T09:30:00+01:00",
            "item": build(static_questionnaire()["item"]),
        }
        issues = validate_response(body, static_questionnaire(), mapping=nf21())
        assert not issues, [i.diagnostics for i in issues]
        return body, given


@dataclass(frozen=True)
class Population:
    database_url: str
    counted: list[Answers]  # the answers of the responses that count, as finally stored


def _created_id(service: FhirService, ctx: RequestContext, res_type: str, body: Json) -> str:
    result = service.create(ctx, res_type, body)
    assert result.status == 201, result.body
    assert result.body is not None
    return str(result.body["id"])


def _populate(database_url: str, scratch: Path) -> list[Answers]:
    """Patients and responses written through the service, so that its intake checks every response
    (Questionnaire known, subject an existing Patient, ``authored``, valid answers).

    The service's content dir has no mappings: intake still validates, but does not score (scoring
    writes some 40 resources per response and is not what this module tests).
    """
    settings = Settings(
        database_url=database_url, mode="development", publish_content=False, content_dir=scratch
    )
    service = build_service(settings)
    try:
        publish_content(service, ROOT)
        ctx = RequestContext(caller=Caller.operator(), base_url="http://testserver/fhir")
        gen = Generator(seed=20240521)
        counted: list[Answers] = []
        start = date(2024, 1, 8)
        stored: list[tuple[str, Json]] = []
        for n in range(PATIENTS):
            patient = _created_id(
                service, ctx, "Patient", {"resourceType": "Patient", "name": [{"family": f"Test{n}"}]}
            )
            levels = gen.patient()
            for week in range(ADMINISTRATIONS):
                when = start + timedelta(days=n + 7 * week)
                body, given = gen.response(gen.administration(levels), patient, when, "completed")
                stored.append((_created_id(service, ctx, "QuestionnaireResponse", body), body))
                counted.append(given)
            if n == 0:
                # Not counted: unfinished, stopped and deleted responses, all at the extreme.
                for status, days in (("in-progress", 30), ("stopped", 31), ("completed", 32)):
                    body, _ = gen.response(
                        gen.administration(levels, extreme=True),
                        patient,
                        start + timedelta(days=days),
                        status,
                    )
                    res_id = _created_id(service, ctx, "QuestionnaireResponse", body)
                    if status == "completed":
                        assert service.delete(ctx, "QuestionnaireResponse", res_id).status in (200, 204)
        # Amended: only the current version counts (its first version had other answers).
        res_id, first = stored[5]
        body, given = gen.response(
            gen.administration(gen.patient()),
            first["subject"]["reference"].removeprefix("Patient/"),
            date(2024, 3, 1),
            "amended",
        )
        updated = service.update(ctx, "QuestionnaireResponse", res_id, {**body, "id": res_id})
        assert updated.status == 200, updated.body
        counted[5] = given
        return counted
    finally:
        service.storage.engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def population(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Population:
    """One populated database per backend for the whole module (writing it is the slow part)."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path_factory.mktemp("calibrate") / "fhir.sqlite3"
        shutil.copy(template, path)
        url = f"sqlite:///{path}"
    else:
        url = request.getfixturevalue("pg_schema_url")
        engine = sa.create_engine(url)
        tables = [ResourceRow.__table__, HistoryRow.__table__, *INDEX_TABLES]  # type: ignore[attr-defined]
        with engine.begin() as conn:
            conn.exec_driver_sql(f"TRUNCATE {', '.join(t.name for t in tables)} RESTART IDENTITY CASCADE")
        engine.dispose()
    return Population(url, _populate(url, tmp_path_factory.mktemp("no-mappings")))


@pytest.fixture(autouse=True)
def _development_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_NORSE_MODE", "development")


def content_pack(root: Path, folders: tuple[str, ...] = ("mappings",)) -> Path:
    """A copy of this checkout's content (the mappings; the whole pack for the content check)."""
    for folder in folders:
        shutil.copytree(ROOT / folder, root / folder)
    return root


def load_yaml(path: Path) -> Json:
    data: Json = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.CSafeLoader)
    return data


def calibrate(population: Population, content: Path, *args: str) -> int:
    """``fhir-norse calibrate`` of nf21 2.1.0, the version the population answered (without
    ``--from-version`` the newest mapping, 2.2.0, would be recalibrated)."""
    source = [] if "--from-version" in args or "--instrument" in args else ["--from-version", "2.1.0"]
    return main(
        [
            "calibrate",
            "--database-url",
            population.database_url,
            "--content-dir",
            str(content),
            *source,
            *args,
        ]
    )


# --- the expected values, computed independently ---------------------------------------------------


def expected_alpha(answer_sets: list[Answers], scale: Scale, min_complete: int) -> tuple[int, float | None]:
    """(complete administrations, Cronbach's alpha or None) by the textbook formula."""
    rows: list[list[int]] = []
    for answers in answer_sets:
        row: list[int] = []
        for link_id in scale.items:
            code = answers.get(link_id)
            if code is None or code == PREFER_NOT:
                break
            if code == NOT_RELEVANT:
                row.append(1)  # no problem, never reversed
            else:
                row.append(8 - int(code) if link_id in scale.reverse_keyed else int(code))
        else:
            rows.append(row)
    k = len(scale.items)
    if len(rows) < min_complete or k < 2:
        return len(rows), None

    def var(xs: list[int]) -> float:
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)

    total = var([sum(r) for r in rows])
    if total == 0:
        return len(rows), None
    items = sum(var([r[j] for r in rows]) for j in range(k))
    return len(rows), k / (k - 1) * (1 - items / total)


def _table(stdout: str) -> dict[str, list[str]]:
    codes = {s.code for s in nf21().scales}
    return {cols[0]: cols[1:] for line in stdout.splitlines() if (cols := line.split()) and cols[0] in codes}


# --- tests ---------------------------------------------------------------------------------------


def test_calibrate_writes_a_pinned_mapping_version(
    population: Population, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content = content_pack(tmp_path, ("mappings", "questionnaires", "profiles"))
    assert calibrate(population, content, "--min-complete", str(MIN_COMPLETE)) == 0
    out, err = capsys.readouterr()
    assert f"{COUNTED} completed or amended responses" in out
    assert "restart the server" in err

    new_file, source_file = content / "mappings" / "nf21-2.1.1.yaml", content / "mappings" / "nf21-2.1.0.yaml"
    written = load_yaml(new_file)
    source = load_yaml(source_file)
    assert written["version"] == "2.1.1"
    assert written["questionnaires"] == {"adaptive": f"{ADAPTIVE}|2.1.0", "static": f"{STATIC}|2.1.0"}

    table = _table(out)
    estimated = kept = 0
    for scale, before, after in zip(nf21().scales, source["scales"], written["scales"], strict=True):
        n, alpha = expected_alpha(population.counted, scale, MIN_COMPLETE)
        assert table[scale.code][:2] == [str(len(scale.items)), str(n)], scale.code
        if alpha is not None and 0 < round(alpha, 3) < 1:
            estimated += 1
            assert after["reliability"]["assumed"] is False
            assert after["reliability"]["value"] == pytest.approx(round(alpha, 3), abs=1e-9)
            assert f"over {n} complete administrations" in after["reliability"]["source"]
            assert table[scale.code][2] == f"{alpha:.3f}"
        else:
            kept += 1
            assert after["reliability"] == before["reliability"], scale.code
            if alpha is None:
                assert " ".join(table[scale.code][2:4]) == "not estimable"
    # The generator opens most scales often and the rare ones seldom: both kinds are exercised.
    assert estimated >= 8
    assert kept >= 3

    # Everything else is the source mapping unchanged.
    def rest(m: Json) -> Json:
        return {
            **{k: v for k, v in m.items() if k not in ("version", "questionnaires", "scales")},
            "scales": [{k: v for k, v in s.items() if k != "reliability"} for s in m["scales"]],
        }

    assert rest(written) == rest(source)
    text = new_file.read_text(encoding="utf-8")
    source_header = source_file.read_text(encoding="utf-8").split("\ninstrument:")[0]
    assert text.startswith(source_header)
    comments = text.split("\ninstrument:")[0][len(source_header) :].splitlines()
    assert comments[0] == "" and comments[1].startswith("# Calibrated by `fhir-norse calibrate` on ")
    calibrated_line = " ".join(line.lstrip("# ") for line in comments[1:])
    assert f"from {COUNTED} completed or amended" in calibrated_line
    assert "nf21 2.1.0" in calibrated_line

    # The pack still passes the content check, and the registry now scores Questionnaire 2.1.0 with 2.1.1.
    assert content_check(content) == 0
    registry = InstrumentRegistry.from_content_dir(content)
    for url in (STATIC, ADAPTIVE):
        chosen = registry.for_questionnaire(url, "2.1.0")
        assert chosen is not None
        assert (chosen.version, chosen.path) == ("2.1.1", new_file)

    # A second run from the same source refuses to overwrite (the registry loads every version).
    before_bytes = new_file.read_bytes()
    capsys.readouterr()
    again = calibrate(population, content, "--min-complete", str(MIN_COMPLETE), "--from-version", "2.1.0")
    assert again == 1
    assert "already exists" in capsys.readouterr().err
    assert new_file.read_bytes() == before_bytes
    assert sorted(p.name for p in (content / "mappings").glob("nf21-*.yaml")) == [
        "nf21-2.1.0.yaml",
        "nf21-2.1.1.yaml",
        "nf21-2.2.0.yaml",
    ]

    # Run again from the calibrated 2.1.1 (2.2.0 is the highest version, with forms of its own): 2.1.2
    # keeps the pin.
    assert calibrate(population, content, "--min-complete", str(MIN_COMPLETE), "--from-version", "2.1.1") == 0
    assert "nf21 2.1.1 -> 2.1.2" in capsys.readouterr().out
    second = load_yaml(content / "mappings" / "nf21-2.1.2.yaml")
    assert second["questionnaires"]["static"] == f"{STATIC}|2.1.0"

    def values(m: Json) -> list[tuple[float, bool]]:
        return [(s["reliability"]["value"], s["reliability"]["assumed"]) for s in m["scales"]]

    assert values(second) == values(written)
    chosen = InstrumentRegistry.from_content_dir(content).for_questionnaire(STATIC, "2.1.0")
    assert chosen is not None and chosen.version == "2.1.2"


def test_dry_run_prints_and_writes_nothing(
    population: Population, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content = content_pack(tmp_path)
    before = sorted(p.name for p in (content / "mappings").iterdir())
    assert calibrate(population, content, "--min-complete", str(MIN_COMPLETE), "--dry-run") == 0
    out, err = capsys.readouterr()
    assert sorted(p.name for p in (content / "mappings").iterdir()) == before
    assert "nf21 2.1.0 -> 2.1.1" in out
    assert len(_table(out)) == len(nf21().scales)
    assert "dry run" in err and "nf21-2.1.1.yaml" in err


def test_too_few_complete_administrations_is_exit_1(
    population: Population, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content = content_pack(tmp_path)
    before = sorted(p.name for p in (content / "mappings").iterdir())
    # With the default minimum (30) only the most common scales could qualify; 100 exceeds the sample.
    assert calibrate(population, content, "--min-complete", "100") == 1
    out, err = capsys.readouterr()
    assert "nothing estimable" in err and "100 complete administrations" in err
    assert len(_table(out)) == len(nf21().scales)
    assert sorted(p.name for p in (content / "mappings").iterdir()) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from-version", "9.9.9"], "no mapping version 9.9.9"),
        (["--instrument", "nope"], "no mapping of instrument 'nope'"),
        (["--instrument", "phq9"], "sum score"),
        (["--new-version", "2.0.0"], "must be higher than the source version 2.1.0"),
        (["--new-version", "two"], "must look like 1.2.3"),
        (["--min-complete", "1"], "at least 2"),
    ],
)
def test_bad_arguments_are_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    # Arguments are checked before the database is opened (this one does not exist).
    content = content_pack(tmp_path)
    assert calibrate(Population(f"sqlite:///{tmp_path / 'none.sqlite3'}", []), content, *args) == 2
    assert message in capsys.readouterr().err
    assert not (content / "mappings" / "nf21-2.1.1.yaml").exists()


def test_an_empty_database_has_nothing_to_estimate(
    sqlite_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "empty.sqlite3"
    shutil.copy(sqlite_template, database)
    content = content_pack(tmp_path / "pack")
    assert calibrate(Population(f"sqlite:///{database}", []), content) == 1
    assert "among 0 completed or amended responses" in capsys.readouterr().err
    missing = Population(f"sqlite:///{tmp_path / 'missing.sqlite3'}", [])
    assert calibrate(missing, content) == 2
    assert "no database at" in capsys.readouterr().err
    assert not (tmp_path / "missing.sqlite3").exists()


def _site_mapping(content: Path, name: str, version: str) -> None:
    """A further nf21 mapping version in ``content``, pinned to Questionnaire 2.1.0."""
    data = load_yaml(SOURCE)
    data["version"] = version
    data["questionnaires"] = {"adaptive": f"{ADAPTIVE}|2.1.0", "static": f"{STATIC}|2.1.0"}
    (content / "mappings" / name).write_text(yaml.dump(data, Dumper=yaml.CSafeDumper), encoding="utf-8")


def test_existing_files_and_versions_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Refusals come before the database is opened (this one does not exist).
    nowhere = Population(f"sqlite:///{tmp_path / 'none.sqlite3'}", [])
    content = content_pack(tmp_path)
    other = content / "mappings" / "notes.txt"
    other.write_text("keep me\n", encoding="utf-8")
    assert calibrate(nowhere, content, "--output", str(other)) == 1
    assert f"{other} already exists" in capsys.readouterr().err
    assert other.read_text(encoding="utf-8") == "keep me\n"

    _site_mapping(content, "nf21-site.yaml", "2.1.1")
    assert calibrate(nowhere, content, "--from-version", "2.1.0") == 1
    assert "nf21 2.1.1 already exists" in capsys.readouterr().err

    _site_mapping(content, "nf21-later.yaml", "2.1.5")
    assert calibrate(nowhere, content, "--from-version", "2.1.0", "--new-version", "2.1.3") == 2
    assert "nf21 2.1.5 (nf21-later.yaml) already scores" in capsys.readouterr().err
    assert sorted(p.name for p in (content / "mappings").iterdir()) == [
        "README.md",
        "gad7-1.0.0.yaml",
        "nf21-2.1.0.yaml",
        "nf21-2.2.0.yaml",
        "nf21-later.yaml",
        "nf21-site.yaml",
        "notes.txt",
        "phq9-1.0.0.yaml",
    ]


# --- the pure helpers ------------------------------------------------------------------------------


def test_which_responses_count() -> None:
    targets = frozenset({(STATIC, "2.1.0"), (ADAPTIVE, "2.1.0")})

    def qr(status: str, questionnaire: str) -> Json:
        return {"resourceType": "QuestionnaireResponse", "status": status, "questionnaire": questionnaire}

    assert counts_response(qr("completed", CANONICAL), targets)
    assert counts_response(qr("amended", f"{ADAPTIVE}|2.1.0"), targets)
    assert counts_response(qr("completed", STATIC), targets)  # a bare url
    assert not counts_response(qr("completed", f"{STATIC}|2.2.0"), targets)
    assert not counts_response(
        qr("completed", "http://fhir-norse.org/fhir/Questionnaire/phq9|1.0.0"), targets
    )
    for status in ("in-progress", "stopped", "entered-in-error"):
        assert not counts_response(qr(status, CANONICAL), targets)
    assert not counts_response({"resourceType": "QuestionnaireResponse", "status": "completed"}, targets)
    assert not counts_response({**qr("completed", CANONICAL), "resourceType": "Observation"}, targets)


@pytest.mark.parametrize(
    ("version", "bumped"), [("2.1.0", "2.1.1"), ("2.1.9", "2.1.10"), ("10.0.41", "10.0.42")]
)
def test_next_patch_version(version: str, bumped: str) -> None:
    assert next_patch_version(version) == bumped
