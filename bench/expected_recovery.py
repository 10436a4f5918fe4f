"""Issue 19: calibrating expected-recovery curves on 1,000 episodes x 20 administrations, and the signal.

    python -m bench.expected_recovery sqlite|postgresql [--episodes 1000] [--administrations 20]
                                      [--skip-load] [--band LOW,HIGH]

1. The benchmark database (``bench.common``: SQLite ``var/bench/bench.sqlite3`` or PostgreSQL schema
   ``bench``) is recreated with the real migrations and loaded with the seeded synthetic cohort of
   ``tests/scoring/recovery_cohort.py`` (seed 19: 70 % improvers, 15 % non-responders, 15 %
   deteriorators, noise SD 0.4): per episode a Patient and a finished EpisodeOfCare, per administration
   the completed static NF 2.1 response (every scale and the alliance answered) and its rom-report
   DiagnosticReport with the episode stamp, written through the storage layer with the server's index
   rows (``bench.load``'s bulk path), then ANALYZE as ``bench.load`` does (on PostgreSQL, without it the
   planner's empty statistics turn the keyset search of the responses into a plan slower than the
   server's 10 s search limit). The score Observations are not written: calibration does not read them.
2. ``fhir-norse calibrate --expected-recovery`` runs on it (the command's function, progress on stderr),
   timed from start to the new mapping written: reading every response once, Cronbach's alpha of every
   scale, the series of every episode, the fit of every scale and of the alliance total.
3. The signal of the fitted Sad Affect curve (and the alliance total's) is judged per episode: on the
   series read back from the database (the cohort it was fitted on) and on a fresh cohort (seed 2019,
   same size): the share of non-responders and deteriorators flagged at some administration
   (sensitivity) and of improvers flagged (false alarms).

Figures go to ``bench/results/expected-recovery-<database>.json``; copy them to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from typing import Any

from bench import common
from fhir_norse.cli.calibrate import calibrate, recovery_sample
from fhir_norse.instruments.schema import load_mapping
from fhir_norse.scoring.recovery import Episode, RecoveryModel, check, model_of
from fhir_norse.store import migrate
from fhir_norse.store.db import create_engine
from tests.scoring.recovery_cohort import STATIC, SyntheticEpisode, cohort, cohort_resources, store

CONTENT = common.ROOT / "var" / "bench" / "expected-recovery-content"
SEED, FRESH_SEED = 19, 2019


def analyze(kind: str, url: str) -> None:
    """Fresh planner statistics after the load (:func:`bench.common.analyze`)."""
    engine = create_engine(url)
    try:
        common.analyze(kind, engine)
    finally:
        engine.dispose()


def flagged(model: RecoveryModel, scores: list[float | None]) -> bool:
    return any(
        (c := check(model, scores[:k])) is not None and c.not_on_track for k in range(2, len(scores) + 1)
    )


def rates(model: RecoveryModel, episodes: list[tuple[str, list[float | None]]]) -> dict[str, Any]:
    """Per course, the share flagged; sensitivity (non-responders and deteriorators) and false alarms."""
    hits: dict[str, list[bool]] = {}
    for course, scores in episodes:
        hits.setdefault(course, []).append(flagged(model, scores))
    off = hits.get("non-responder", []) + hits.get("deteriorator", [])
    return {
        "by_course": {c: round(sum(h) / len(h), 3) for c, h in sorted(hits.items())},
        "sensitivity": round(sum(off) / len(off), 3),
        "false_alarm_rate": round(sum(hits["improver"]) / len(hits["improver"]), 3),
        "episodes": {c: len(h) for c, h in sorted(hits.items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("database", choices=["sqlite", "postgresql"])
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--administrations", type=int, default=20)
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument(
        "--band", default="10,90", help="the band's residual percentiles, as calibrate --band (default 10,90)"
    )
    args = parser.parse_args(argv)
    url = common.database_url(args.database)
    cases = cohort(SEED, args.episodes, args.administrations)
    shutil.rmtree(CONTENT, ignore_errors=True)
    shutil.copytree(common.ROOT / "mappings", CONTENT / "mappings")
    source = load_mapping(CONTENT / "mappings" / "nf21-2.2.0.yaml")

    load_s = None
    written = None
    if not args.skip_load:
        common.reset(args.database)
        engine = create_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        started = time.perf_counter()
        written = store(url, cohort_resources(cases, source))
        analyze(args.database, url)  # as bench.load does (and autovacuum would, on a live server)
        load_s = time.perf_counter() - started
        common.log(f"loaded {written:,} resources in {load_s:.1f} s")

    started = time.perf_counter()
    low, high = (float(part) for part in args.band.split(","))
    result = calibrate(
        url, CONTENT, from_version="2.2.0", expected_recovery=True, band=(low, high), progress=sys.stderr
    )
    calibrate_s = time.perf_counter() - started
    common.log(f"calibrated in {calibrate_s:.1f} s: wrote {result.output}")

    fitted = load_mapping(result.output)
    sad_block = fitted.scale("sad").expected_recovery
    total_block = fitted.alliance.expected_recovery
    assert sad_block is not None and total_block is not None
    sad, total = model_of(sad_block), model_of(total_block)
    course = {f"Patient/p{e.patient:05d}": e.course for e in cases}
    sample = recovery_sample(url, frozenset({(STATIC, "2.2.0")}), source)

    def stored(key: str) -> list[tuple[str, list[float | None]]]:
        episodes: list[Episode] = sample.series[key]
        return [(course[e.patient], list(e.scores)) for e in episodes]

    fresh: list[SyntheticEpisode] = cohort(FRESH_SEED, args.episodes, args.administrations)
    figures = {
        "database": args.database,
        "episodes": args.episodes,
        "administrations": args.administrations,
        "band_percentiles": [low, high],
        "resources_loaded": written,
        "load_s": None if load_s is None else round(load_s, 1),
        "calibrate_s": round(calibrate_s, 1),
        "responses_read": result.n_responses,
        "sad_model": sad_block.model_dump(mode="json"),
        "signal_sad_in_sample_db": rates(sad, stored("sad")),
        "signal_sad_fresh_cohort": rates(sad, [(e.course, list(e.scores)) for e in fresh]),
        "signal_alliance_in_sample_db": rates(total, stored("alliance:total")),
        "signal_alliance_fresh_cohort": rates(total, [(e.course, list(e.alliance)) for e in fresh]),
        "code": common.code_version(),
    }
    suffix = "" if (low, high) == (10.0, 90.0) else f"-band{low:g}-{high:g}"
    path = common.write_json(f"expected-recovery-{args.database}{suffix}.json", figures)
    for key in ("signal_sad_in_sample_db", "signal_sad_fresh_cohort", "signal_alliance_fresh_cohort"):
        print(key, figures[key])
    print(f"calibrate {calibrate_s:.1f} s for {result.n_responses:,} responses; figures in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
