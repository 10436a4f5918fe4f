"""``fhir-norse calibrate --expected-recovery`` on the seeded synthetic cohort (SQLite and PostgreSQL).

The database holds 300 finished episodes of 10 administrations (``tests/scoring/recovery_cohort.py``:
improvers, non-responders and deteriorators with noise), written through the storage layer as the
server stores them: per administration the completed static response, whose answers give the course's
scale scores as nearly as whole answers can, and its DiagnosticReport with the episode stamp. The
command reads them back, fits every scale and the alliance total, and writes a new mapping version.
The fitted ``sad`` curve must lie within 0.3 score points of the generating curve (intake 2.5-5.5,
administrations 2-10), and the signal of the written model, judged on the series read back from the
database, must find the deteriorators and most non-responders with few false alarms (figures printed).
"""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path

import pytest
import yaml

from fhir_norse.cli import main
from fhir_norse.cli.calibrate import recovery_sample
from fhir_norse.instruments.registry import InstrumentRegistry
from fhir_norse.instruments.schema import InstrumentMapping, load_mapping
from fhir_norse.scoring.recovery import check, model_of
from tests.scoring.recovery_cohort import STATIC, cohort, cohort_resources, generating_expected, store

ROOT = Path(__file__).resolve().parents[2]
EPISODES, ADMINISTRATIONS = 300, 10


@pytest.fixture(autouse=True)
def _development_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_NORSE_MODE", "development")


def _content(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    return tmp_path


def _mapping() -> InstrumentMapping:
    return load_mapping(ROOT / "mappings" / "nf21-2.2.0.yaml")


def _calibrate(database_url: str, content: Path, *args: str) -> int:
    return main(
        [
            "calibrate",
            "--database-url",
            database_url,
            "--content-dir",
            str(content),
            "--expected-recovery",
            *args,
        ]
    )


def test_the_fit_recovers_the_curve_and_the_signal_finds_the_off_track(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = cohort(19, EPISODES, ADMINISTRATIONS)
    store(database_url, cohort_resources(cases, _mapping()))
    content = _content(tmp_path)
    assert _calibrate(database_url, content) == 0
    out, err = capsys.readouterr()
    assert f"calibrate: {EPISODES * ADMINISTRATIONS} responses read" in err
    written = content / "mappings" / "nf21-2.2.1.yaml"
    mapping = load_mapping(written)  # a valid mapping, loaded as the server loads it
    sad = mapping.scale("sad").expected_recovery
    assert sad is not None and sad.n_episodes == EPISODES and sad.n_patients == EPISODES
    assert sad.n_scores == EPISODES * (ADMINISTRATIONS - 1) and sad.max_administration == ADMINISTRATIONS
    assert sad.fitted == date.today() and "finished EpisodeOfCare" in sad.sample
    assert not mapping.scale("sad").not_on_track_signal  # the switch stays as the source had it
    model = model_of(sad)
    worst = max(
        abs(model.expected(k, x) - generating_expected(k, x))
        for k in range(2, ADMINISTRATIONS + 1)
        for x in (2.5 + 0.25 * i for i in range(13))
    )
    assert worst < 0.3
    total = mapping.alliance.expected_recovery
    assert total is not None and not total.higher_is_worse and total.n_episodes == EPISODES
    assert "sad" in out and "alliance:total" in out
    # The header says what was fitted; the source is untouched.
    assert "Expected-recovery curves" in written.read_text(encoding="utf-8")
    assert "expected_recovery" not in (ROOT / "mappings" / "nf21-2.2.0.yaml").read_text(encoding="utf-8")

    # The signal of the written model on the series as the database holds them.
    registry = InstrumentRegistry.from_content_dir(content)
    instrument = registry.for_questionnaire(STATIC, "2.2.0")
    assert instrument is not None and instrument.version == "2.2.1"
    sample = recovery_sample(database_url, frozenset({(STATIC, "2.2.0")}), mapping)
    course = {f"Patient/p{e.patient:05d}": e.course for e in cases}
    hits: dict[str, list[bool]] = {}
    for episode in sample.series["sad"]:
        scores = list(episode.scores)
        raised = any(
            (c := check(model, scores[:k])) is not None and c.not_on_track for k in range(2, len(scores) + 1)
        )
        hits.setdefault(course[episode.patient], []).append(raised)
    found = {c: sum(h) / len(h) for c, h in hits.items()}
    off = hits["non-responder"] + hits["deteriorator"]
    print(f"\n{database_url.split(':')[0]}: {found}; sensitivity {sum(off) / len(off):.2f}")
    assert len(hits["improver"]) == 210 and len(off) == 90
    assert found["deteriorator"] >= 0.7
    assert found["improver"] <= 0.05


def test_too_few_episodes_write_nothing(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store(database_url, cohort_resources(cohort(5, 12, 4), _mapping()))
    content = _content(tmp_path)
    assert _calibrate(database_url, content) == 1
    out, err = capsys.readouterr()
    assert "too little data for an expected-recovery curve" in err and "nothing written" in err
    assert "too few episodes (minimum 30)" in out
    assert not (content / "mappings" / "nf21-2.2.1.yaml").exists()
    # With a lower minimum the same data is enough; episodes still open are the fallback sample.
    assert _calibrate(database_url, content, "--min-episodes", "10", "--dry-run") == 0


def test_the_band_percentiles_are_chosen_and_checked(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store(database_url, cohort_resources(cohort(7, 40, 5), _mapping()))
    content = _content(tmp_path)
    for bad in ("90,10", "10", "ten,90", "-5,90", "10,101"):
        with pytest.raises(SystemExit) as refused:
            _calibrate(database_url, content, "--band", bad)
        assert refused.value.code == 2
        assert "--band" in capsys.readouterr().err
    assert not (content / "mappings" / "nf21-2.2.1.yaml").exists()

    assert (
        _calibrate(database_url, content, "--band", "25,75", "--output", str(tmp_path / "narrow.yaml")) == 0
    )
    assert _calibrate(database_url, content, "--output", str(tmp_path / "default.yaml")) == 0
    narrow = load_mapping(tmp_path / "narrow.yaml").scale("sad").expected_recovery
    default = load_mapping(tmp_path / "default.yaml").scale("sad").expected_recovery
    assert narrow is not None and default is not None
    assert narrow.band.percentiles == (25.0, 75.0) and default.band.percentiles == (10.0, 90.0)
    # The same residuals, cut nearer their middle: a narrower band on both sides.
    assert default.band.low < narrow.band.low <= 0 <= narrow.band.high < default.band.high


def test_without_finished_episodes_every_episode_is_the_sample(database_url: str, tmp_path: Path) -> None:
    store(database_url, cohort_resources(cohort(6, 40, 5), _mapping(), status="active"))
    content = _content(tmp_path)
    assert _calibrate(database_url, content) == 0
    data = yaml.safe_load((content / "mappings" / "nf21-2.2.1.yaml").read_text(encoding="utf-8"))
    block = data["scales"][0]["expected_recovery"]
    assert "every EpisodeOfCare (none is finished)" in block["sample"] and block["n_episodes"] == 40
