"""Deterministic synthetic data for the issue-2 benchmark.

``patients(n)`` yields Patients; ``observations(patient_id, m, rng)`` yields survey-style
Observations (category survey, one of ten LOINC codes, subject, performer, a score as a
valueQuantity and an effectiveDateTime spread over two years). The same seed gives the
same resources, ids included.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

SEED = 20240502

# Survey instruments and their total-score LOINC codes (code, display, max score).
CODES: list[tuple[str, str, int]] = [
    ("44261-6", "Patient Health Questionnaire 9 item (PHQ-9) total score", 27),
    ("70274-6", "Generalized anxiety disorder 7 item (GAD-7) total score", 21),
    ("55758-7", "Patient Health Questionnaire 2 item (PHQ-2) total score", 6),
    ("72133-2", "Montreal Cognitive Assessment [MoCA] total score", 30),
    ("72106-8", "Total score [MMSE]", 30),
    ("71934-4", "Edinburgh Postnatal Depression Scale total score", 30),
    ("89204-2", "Patient Health Questionnaire-15 total score", 30),
    ("75626-2", "Total score [AUDIT-C]", 12),
    ("68517-2", "Drug Abuse Screening Test-10 total score", 10),
    ("72172-0", "Kessler Psychological Distress Scale K10 total score", 50),
]
LOINC = "http://loinc.org"
START = datetime(2023, 1, 1)
SPAN_SECONDS = 2 * 365 * 24 * 3600

GIVEN = [
    "Anna",
    "Björn",
    "Carla",
    "David",
    "Eva",
    "Frank",
    "Greta",
    "Hans",
    "Ingrid",
    "Jonas",
    "Karin",
    "Lars",
    "Maria",
    "Nils",
    "Olga",
    "Peter",
    "Rita",
    "Sven",
    "Tove",
    "Ulf",
]
FAMILY = [
    "Andersen",
    "Berg",
    "Christensen",
    "Dahl",
    "Eriksen",
    "Fjeld",
    "Hansen",
    "Iversen",
    "Johansen",
    "Karlsen",
    "Larsen",
    "Moen",
    "Nilsen",
    "Olsen",
    "Pedersen",
    "Solberg",
]


def patient_id(i: int) -> str:
    return f"pat-{i:06d}"


def observation_id(i: int, j: int) -> str:
    return f"obs-{i:06d}-{j:03d}"


def patient(i: int, rng: random.Random) -> dict[str, Any]:
    birth = datetime(1930, 1, 1) + timedelta(days=rng.randrange(0, 75 * 365))
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:2.16.578.1.12.4.1.4.1", "value": f"{10000000000 + i * 7919}"}],
        "active": True,
        "name": [{"use": "official", "family": rng.choice(FAMILY), "given": [rng.choice(GIVEN)]}],
        "gender": rng.choice(["female", "male"]),
        "birthDate": birth.strftime("%Y-%m-%d"),
    }


def observation(pid: str, rng: random.Random) -> dict[str, Any]:
    code, display, top = rng.choice(CODES)
    when = START + timedelta(seconds=rng.randrange(SPAN_SECONDS))
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "survey",
                        "display": "Survey",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "performer": [{"reference": f"Practitioner/prac-{rng.randrange(50):03d}"}],
        "valueQuantity": {
            "value": rng.randrange(top + 1),
            "unit": "{score}",
            "system": "http://unitsofmeasure.org",
            "code": "{score}",
        },
    }


def generate(patients: int, per_patient: int, seed: int = SEED) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(resource type, id, body) for every resource, each Patient followed by its Observations."""
    rng = random.Random(seed)
    for i in range(patients):
        pid = patient_id(i)
        yield "Patient", pid, patient(i, rng)
        for j in range(per_patient):
            yield "Observation", observation_id(i, j), observation(pid, rng)
