"""The adaptive history memo stays within its bound (issue 14, "memory flat after warm-up"): before,
the facts of every Observation version read were kept up to 200,000 and every patient's whole
history up to 2,000 patients, so a server's memory grew through a 10-minute soak."""

from __future__ import annotations

import orjson

from fhir_norse.adaptive.history import Fact
from fhir_norse.adaptive.state import Measured
from fhir_norse.canonicals import CS_SCALES
from fhir_norse.rom.patient import HistoryMemo, _History, _parse_fact

SCALES = frozenset({"sad"})


def _history(rows: int, first_pk: int = 0) -> _History:
    return _History({(first_pk + i, 1): None for i in range(rows)}, [])


def test_the_memo_holds_at_most_its_bound_of_versions_after_many_patients() -> None:
    memo = HistoryMemo(limit_rows=1_000)
    for patient in range(500):  # 500 patients of 30 versions each: 15 times the bound
        memo.put((f"Patient/{patient}", SCALES), _history(30, patient * 100))
        assert memo.rows <= 1_000
    assert memo.rows == sum(len(e.facts) for e in memo._entries.values()) == 990
    assert len(memo) == 33


def test_the_least_recently_used_patient_goes_first() -> None:
    memo = HistoryMemo(limit_rows=100)
    memo.put(("Patient/a", SCALES), _history(40))
    memo.put(("Patient/b", SCALES), _history(40))
    assert memo.get(("Patient/a", SCALES)) is not None  # a is now the more recent
    memo.put(("Patient/c", SCALES), _history(40))
    assert memo.get(("Patient/b", SCALES)) is None
    assert memo.get(("Patient/a", SCALES)) is not None
    assert memo.get(("Patient/c", SCALES)) is not None
    assert memo.rows == 80


def test_a_patients_new_history_replaces_the_old_one_in_the_count() -> None:
    memo = HistoryMemo(limit_rows=100)
    memo.put(("Patient/a", SCALES), _history(40))
    memo.put(("Patient/a", SCALES), _history(70))
    assert (len(memo), memo.rows) == (1, 70)


def test_a_history_over_the_bound_is_not_kept() -> None:
    memo = HistoryMemo(limit_rows=100)
    memo.put(("Patient/a", SCALES), _history(40))
    memo.put(("Patient/b", SCALES), _history(101))
    assert memo.get(("Patient/b", SCALES)) is None
    assert memo.get(("Patient/a", SCALES)) is not None and memo.rows == 40


def _observation(response: str, code: str, value: float) -> str:
    return orjson.dumps(
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": CS_SCALES, "code": code}]},
            "derivedFrom": [{"reference": f"QuestionnaireResponse/{response}"}],
            "effectiveDateTime": "2026-01-05T10:00:00Z",
            "valueQuantity": {"value": value},
            "component": [],
        }
    ).decode()


def test_facts_of_one_administration_share_their_strings() -> None:
    shared: dict[str, str] = {}
    first = _parse_fact(_observation("r1", "sad", 2.5), SCALES, shared)
    second = _parse_fact(_observation("r1", "sad", 3.0), SCALES, shared)
    assert isinstance(first, Fact) and isinstance(second, Fact)
    assert first.response == "r1" and first.value == 2.5 and second.value == 3.0
    assert first.response is second.response and first.authored is second.authored
    assert first.system is second.system and first.code is second.code
    assert isinstance(first.measured, Measured) and not hasattr(first.measured, "__dict__")
