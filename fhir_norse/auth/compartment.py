"""The R4 Patient compartment, as pure functions over search-index reference rows.

https://hl7.org/fhir/R4/compartmentdefinition-patient.html lists, per resource type, the search
parameters whose references put a resource into a Patient's compartment (Observation:
``subject`` and ``performer``; QuestionnaireResponse: ``subject`` and ``author``; Patient:
``link``, besides the patient itself; ...). The definition is the official one, extracted into
``fhir_norse/definitions/compartment-patient.json`` by ``tools/extract_compartment.py``. A type it
does not list (Questionnaire, Practitioner, Task, Subscription, Binary...) is in no Patient's
compartment.

The functions take the :class:`~fhir_norse.store.rows.ReferenceRow` s the search
extractor produces, so the same answer holds for a stored resource (its index rows) and for a
body about to be written (``default_extractor().extract(body)``).

Only *local* references count (``Patient/1``, ``Patient/1/_history/2``). An absolute reference
(``https://other.example/fhir/Patient/1``) names a patient on some server, not necessarily ours,
so it counts only when it starts with one of the ``base_urls`` the caller passes (this server's
own base). Contained and logical references name no stored patient and never count.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from functools import cache

from fhir_norse import definitions
from fhir_norse.store.rows import IndexRow, ReferenceRow

DEFINITION = definitions.DIR / "compartment-patient.json"


@cache
def _params_by_type() -> Mapping[str, tuple[str, ...]]:
    definition = json.loads(DEFINITION.read_text(encoding="utf-8"))
    return {entry["code"]: tuple(entry.get("param", ())) for entry in definition["resource"]}


def patient_compartment_params(resource_type: str) -> tuple[str, ...]:
    """The search parameter codes that put a ``resource_type`` into a Patient's compartment,
    in the definition's order; empty when the type is never in one."""
    return _params_by_type().get(resource_type, ())


@cache
def in_compartment_types() -> frozenset[str]:
    """The resource types that can be in a Patient compartment (those with any parameter)."""
    return frozenset(t for t, params in _params_by_type().items() if params)


def _local_patient_id(row: ReferenceRow, base_urls: Collection[str]) -> str | None:
    """The id of the patient ``row`` targets on this server, if it targets one."""
    if row.target_type != "Patient" or not row.target_id:
        return None
    if row.url is None:
        return row.target_id
    # ``parse_reference`` keeps the URL without ``/_history/n``, so it ends in ``Patient/<id>``.
    for base in base_urls:
        if row.url == f"{base.rstrip('/')}/Patient/{row.target_id}":
            return row.target_id
    return None


def patients_referenced(
    resource_type: str,
    reference_rows: Iterable[IndexRow],
    *,
    resource_id: str | None = None,
    base_urls: Collection[str] = (),
) -> set[str]:
    """The ids of every patient whose compartment the resource is in (for the audit trail's
    "patient concerned" and for checking a write). A Patient is in its own compartment, so pass
    ``resource_id`` to have a Patient's own id included. Rows other than
    :class:`ReferenceRow`, and rows of parameters outside the compartment, are skipped."""
    params = patient_compartment_params(resource_type)
    found: set[str] = set()
    if resource_type == "Patient" and resource_id:
        found.add(resource_id)
    if not params:
        return found
    for row in reference_rows:
        if isinstance(row, ReferenceRow) and row.param in params:
            patient = _local_patient_id(row, base_urls)
            if patient is not None:
                found.add(patient)
    return found


def resource_in_patient_compartment(
    resource_type: str,
    resource_id: str,
    reference_rows: Iterable[IndexRow],
    patient_id: str,
    *,
    base_urls: Collection[str] = (),
) -> bool:
    """Whether the resource is in the compartment of ``Patient/patient_id``: it is that Patient,
    or a compartment parameter of its type references that Patient."""
    if resource_type == "Patient" and resource_id == patient_id:
        return True
    params = patient_compartment_params(resource_type)
    return any(
        isinstance(row, ReferenceRow)
        and row.param in params
        and _local_patient_id(row, base_urls) == patient_id
        for row in reference_rows
    )
