"""A seeded synthetic cohort with a known course (issue 19), for the expected-recovery tests and bench.

Each episode starts at an intake score ``x`` drawn uniformly from 2.5-5.5 on the 1-7 clinical scale
(higher = worse) and follows one of three courses in ``ln k`` (``k`` = administration number, 1 = intake):

* improvers (70 %): ``x + (0.10 - 0.18 x) ln k`` (intake 5 -> about 2.6 at the 20th administration);
* non-responders (15 %): ``x`` (flat);
* deteriorators (15 %): ``x + 0.30 ln k``;

plus independent normal noise (SD ``noise``, default 0.4) on every score after intake, rounded to the
instrument's 2 decimals and kept within 1-7. The cohort's expected course given the intake, the mixture
mean, is itself of the model's form: ``b0 = 0``, ``b1 = 0.7 x 0.10 + 0.15 x 0.30 = 0.115``, ``b2 = 1``,
``b3 = -0.7 x 0.18 = -0.126`` (:data:`GENERATING`); that is the curve a fit must recover. The alliance
total is the mirror image (``8 - score``: higher is better; improvers' alliance grows).

Courses are assigned by position (14 improvers, 3 non-responders, 3 deteriorators in every 20 episodes),
so the shares are exact; everything else comes from ``random.Random(seed)``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from fhir_norse.instruments.schema import InstrumentMapping

Json = dict[str, Any]

__all__ = [
    "GENERATING",
    "Course",
    "SyntheticEpisode",
    "answers_for",
    "cohort",
    "cohort_resources",
    "generating_expected",
    "store",
]

Course = Literal["improver", "non-responder", "deteriorator"]

# (b0, b1, b2, b3) of the mixture mean (module doc).
GENERATING = (0.0, 0.7 * 0.10 + 0.15 * 0.30, 1.0, -0.7 * 0.18)


def generating_expected(k: int, intake: float) -> float:
    """The cohort's expected clinical score at administration ``k >= 2`` given the intake."""
    b0, b1, b2, b3 = GENERATING
    lk = math.log(k)
    return b0 + b1 * lk + b2 * intake + b3 * intake * lk


@dataclass(frozen=True)
class SyntheticEpisode:
    patient: int
    course: Course
    scores: tuple[float, ...]  # the clinical scale, intake first

    @property
    def alliance(self) -> tuple[float, ...]:
        """The alliance total (higher is better): the mirror image of the clinical scores."""
        return tuple(round(8 - s, 2) for s in self.scores)

    @property
    def off_track(self) -> bool:
        """A non-responder or a deteriorator: an episode the signal should find."""
        return self.course != "improver"


def _course(index: int) -> Course:
    slot = index % 20
    return "improver" if slot < 14 else "non-responder" if slot < 17 else "deteriorator"


def _true(course: Course, intake: float, k: int) -> float:
    lk = math.log(k)
    if course == "improver":
        return intake + (0.10 - 0.18 * intake) * lk
    if course == "non-responder":
        return intake
    return intake + 0.30 * lk


def cohort(seed: int, episodes: int, administrations: int, *, noise: float = 0.4) -> list[SyntheticEpisode]:
    """``episodes`` episodes (one patient each) of ``administrations`` scores each (module doc)."""
    rng = random.Random(seed)
    out: list[SyntheticEpisode] = []
    for i in range(episodes):
        course = _course(i)
        intake = round(rng.uniform(2.5, 5.5), 2)
        scores = [intake]
        for k in range(2, administrations + 1):
            value = _true(course, intake, k) + rng.gauss(0.0, noise)
            scores.append(round(min(7.0, max(1.0, value)), 2))
        out.append(SyntheticEpisode(i, course, tuple(scores)))
    return out


# --- into a database -------------------------------------------------------------------------------

STATIC = "http://fhir-norse.org/fhir/Questionnaire/nf21-static"
ANSWERS = "http://fhir-norse.org/fhir/CodeSystem/nf21-answers"


def _spread(target: float, items: int) -> list[int]:
    """Integer answers 1-7 whose mean is the nearest one to ``target`` these items can give."""
    total = min(7 * items, max(items, round(target * items)))
    base, extra = divmod(total, items)
    return [base + 1 if i < extra else base for i in range(items)]


def answers_for(
    mapping: InstrumentMapping, scale_scores: dict[str, float], alliance: float
) -> dict[str, str]:
    """Answer codes of a full static administration whose scale means and alliance total are as near
    ``scale_scores`` and ``alliance`` as whole answers allow (reverse-keyed items written ``8 - x``)."""
    out: dict[str, str] = {}
    for scale in mapping.scales:
        reverse = set(scale.reverse_keyed)
        for link_id, value in zip(
            scale.items, _spread(scale_scores[scale.code], len(scale.items)), strict=True
        ):
            out[link_id] = str(8 - value if link_id in reverse else value)
    items = mapping.alliance.items
    for link_id, value in zip(items, _spread(alliance, len(items)), strict=True):
        out[link_id] = str(value)
    for item in [*mapping.single, *mapping.medication]:
        out[item.link_id] = "4"
    return out


def response(res_id: str, patient: str, authored: str, version: str, answers: dict[str, str]) -> Json:
    return {
        "resourceType": "QuestionnaireResponse",
        "id": res_id,
        "questionnaire": f"{STATIC}|{version}",
        "status": "completed",
        "subject": {"reference": patient},
        "authored": authored,
        "item": [
            {"linkId": link_id, "answer": [{"valueCoding": {"system": ANSWERS, "code": code}}]}
            for link_id, code in answers.items()
        ],
    }


def report(res_id: str, patient: str, episode: str, when: str) -> Json:
    """The ``rom-report`` DiagnosticReport scoring writes for response ``res_id``: its id, status, code,
    subject, time and episode stamp as scoring writes them (what calibration reads of it); without the
    ``result`` list and the conclusion, which it does not read."""
    from fhir_norse.canonicals import CS_ROM, PROFILE_REPORT
    from fhir_norse.rom.intake import derived_id
    from fhir_norse.rom.patient import episode_extension

    return {
        "resourceType": "DiagnosticReport",
        "id": derived_id(res_id, "report"),
        "meta": {"profile": [PROFILE_REPORT]},
        "extension": [episode_extension(episode)],
        "status": "final",
        "category": [{"coding": [{"system": CS_ROM, "code": "rom"}]}],
        "code": {"coding": [{"system": CS_ROM, "code": "rom-feedback-report"}]},
        "subject": {"reference": patient},
        "effectiveDateTime": when,
        "issued": when,
    }


def cohort_resources(
    episodes: Sequence[SyntheticEpisode],
    mapping: InstrumentMapping,
    *,
    status: str = "finished",
    start: datetime = datetime(2025, 1, 6, 9, tzinfo=UTC),
) -> Iterator[tuple[str, str, Json]]:
    """(type, id, body) of everything the cohort's database holds: per episode a Patient, its
    EpisodeOfCare (``status``), and per administration the completed QuestionnaireResponse and its
    DiagnosticReport (:func:`report`; the score Observations, which calibration does not read, are left
    out to keep the load short). Every scale follows the episode's course from an intake of its own
    (``sad`` from the episode's); the alliance total mirrors ``sad``."""
    rng = random.Random(len(episodes))
    for ep in episodes:
        patient_id = f"p{ep.patient:05d}"
        patient = f"Patient/{patient_id}"
        episode = f"EpisodeOfCare/e{ep.patient:05d}"
        first = start + timedelta(days=ep.patient % 200)
        yield (
            "Patient",
            patient_id,
            {"resourceType": "Patient", "id": patient_id, "name": [{"family": f"C{ep.patient}"}]},
        )
        yield (
            "EpisodeOfCare",
            episode.split("/")[1],
            {
                "resourceType": "EpisodeOfCare",
                "id": episode.split("/")[1],
                "status": status,
                "patient": {"reference": patient},
                "period": {"start": first.date().isoformat()},
            },
        )
        offsets = {s.code: rng.uniform(-1.5, 1.5) for s in mapping.scales}
        offsets["sad"] = 0.0
        for k, score in enumerate(ep.scores, start=1):
            res_id = f"r{ep.patient:05d}-{k:02d}"
            when = (first + timedelta(days=7 * (k - 1))).isoformat()
            scales = {code: min(7.0, max(1.0, score + off)) for code, off in offsets.items()}
            body = response(res_id, patient, when, mapping.version, answers_for(mapping, scales, 8 - score))
            yield "QuestionnaireResponse", res_id, body
            built = report(res_id, patient, episode, when)
            yield "DiagnosticReport", str(built["id"]), built


def store(database_url: str, resources: Iterable[tuple[str, str, Json]], *, batch: int = 1000) -> int:
    """Write ``resources`` as the server stores them (stamped meta, the server's index rows) with one
    multi-row INSERT per table per batch (``bench.load``'s bulk path); how many were written."""
    from bench.load import _bulk_batch
    from fhir_norse.server.resources import now_ms, stamp_meta
    from fhir_norse.server.search.extract import default_extractor
    from fhir_norse.store.db import create_engine
    from fhir_norse.store.storage import Storage

    engine = create_engine(database_url)
    extractor = default_extractor()
    written = 0
    try:
        storage = Storage(engine)
        chunk: list[tuple[str, str, Json, Any, list[Any]]] = []

        def flush() -> None:
            with storage.write() as uow:
                _bulk_batch(uow.conn, chunk)
            chunk.clear()

        for res_type, res_id, body in resources:
            lu = now_ms()
            stamped = stamp_meta(body, res_id, 1, lu)
            chunk.append((res_type, res_id, stamped, lu, extractor.extract(stamped)))
            written += 1
            if len(chunk) >= batch:
                flush()
        if chunk:
            flush()
    finally:
        engine.dispose()
    return written
