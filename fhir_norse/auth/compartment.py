"""The R4 Patient compartment and this server's extension of it, as pure functions over index rows.

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

A ``patient/`` or ``user/`` token reaches resources through the patients they belong to, so every
stored type needs an answer to "how does a resource of this type belong to a patient?"
(:func:`reach_of`, the table in the README's "Which resources a patient or practitioner token
reaches"):

* the R4 compartment types, through the definition's parameters;
* :data:`SERVER_COMPARTMENT`: types R4 leaves out but this server stores per patient (Task, through
  ``for`` and ``owner``; Binary, through the resource its ``securityContext`` names);
* :data:`SHARED_TYPES`: definitional and directory resources that hold no patient's data (read as the
  scopes allow, written only with system access);
* :data:`SYSTEM_ONLY_TYPES` (Group) and every other type (Subscription, and any type added later until
  it is classified here): never reached by a restricted caller.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from functools import cache
from types import MappingProxyType
from typing import Any

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


class Reach(enum.Enum):
    """How a restricted caller (``patient/`` or ``user/`` access) reaches resources of a type."""

    # Those of its patients only: the type belongs to patients (R4 compartment or this server's extension).
    PATIENTS = "patients"
    # All of them for reading, as the scopes allow; none for writing (system access only).
    SHARED = "shared"
    # None at all: 403 for every interaction on the type.
    NONE = "none"


# Binary.securityContext "identifies another resource that can be used as a proxy of the security
# sensitivity to use when deciding and enforcing access control rules for the Binary"
# (https://hl7.org/fhir/R4/binary-definitions.html#Binary.securityContext). It is no R4 search parameter,
# so it is read from the body, and the Binary belongs to the patients of the resource it names (or to the
# patient it names).
SECURITY_CONTEXT = "securityContext"

# This server's extension of the Patient compartment: types outside the R4 definition that it stores per
# patient, and the parameters whose Patient references put them in a patient's compartment. Task: the
# intake's "review this alert" Task is ``for`` the patient (``patient``), and a Task may be ``owner``-ed
# by one. Binary: its securityContext (above), a parameter of this server's own, never a search parameter.
SERVER_COMPARTMENT: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"Task": ("patient", "owner"), "Binary": (SECURITY_CONTEXT,)}
)

# Types that hold no patient's data: conformance, terminology and the practitioner/organization
# directory. A restricted caller reads them as its scopes allow and never writes them.
SHARED_TYPES: frozenset[str] = frozenset(
    {
        "Practitioner",
        "PractitionerRole",
        "Organization",
        "Questionnaire",
        "CodeSystem",
        "ValueSet",
        "ConceptMap",
        "StructureDefinition",
        "SearchParameter",
        "OperationDefinition",
        "Library",
    }
)

# Types of the R4 compartment that a restricted caller never reaches all the same: a Group is a cohort (the
# Bulk Data export's unit), and its member list names other patients, so a patient's or practitioner's
# token would learn who else is in it. Groups are read and written with system access only.
SYSTEM_ONLY_TYPES: frozenset[str] = frozenset({"Group"})

# ``Type/id`` or ``Type/id/_history/v``: a local literal reference (https://hl7.org/fhir/R4/references.html).
_LOCAL_REFERENCE = re.compile(r"^(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


def reach_of(resource_type: str) -> Reach:
    """How a restricted caller reaches ``resource_type`` (module doc): unclassified types fail closed."""
    if resource_type in SHARED_TYPES:
        return Reach.SHARED
    if resource_type in SYSTEM_ONLY_TYPES:
        return Reach.NONE
    if membership_params(resource_type):
        return Reach.PATIENTS
    return Reach.NONE


def membership_params(resource_type: str) -> tuple[str, ...]:
    """The parameters that put a ``resource_type`` into a patient's compartment on this server: the R4
    definition's, else this server's extension (:data:`SERVER_COMPARTMENT`); empty when none do."""
    return patient_compartment_params(resource_type) or SERVER_COMPARTMENT.get(resource_type, ())


def searchable(resource_type: str) -> bool:
    """Whether a search can be limited to a patient's compartment (its parameters are indexed)."""
    return SECURITY_CONTEXT not in membership_params(resource_type)


def security_context(resource_type: str, body: Mapping[str, Any]) -> tuple[str, str] | None:
    """(type, id) of the local resource a Binary's securityContext names; None for any other type or
    reference (absent, absolute, contained or logical)."""
    if SECURITY_CONTEXT not in SERVER_COMPARTMENT.get(resource_type, ()):
        return None
    context = body.get(SECURITY_CONTEXT)
    reference = context.get("reference") if isinstance(context, Mapping) else None
    match = _LOCAL_REFERENCE.match(reference) if isinstance(reference, str) else None
    return None if match is None else (match["type"], match["id"])


def context_rows(patients: Iterable[str]) -> list[ReferenceRow]:
    """The rows that put a Binary into the compartments of ``patients`` (those of its securityContext)."""
    return [ReferenceRow(SECURITY_CONTEXT, "Patient", patient) for patient in sorted(set(patients))]


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
    return _patients(
        patient_compartment_params(resource_type),
        resource_type,
        reference_rows,
        resource_id,
        lambda row: _local_patient_id(row, base_urls),
    )


def patients_belonging(
    resource_type: str,
    reference_rows: Iterable[IndexRow],
    *,
    resource_id: str | None = None,
    local_only: bool = True,
) -> set[str]:
    """The patients a resource belongs to on this server (:func:`membership_params`): what reads,
    searches and the audit trail go by. With ``local_only=False`` also the ids of patients named by an
    absolute reference (a reference search for ``Patient/1`` matches those too), which is what a
    restricted caller's write must keep within its reach."""
    return _patients(
        membership_params(resource_type),
        resource_type,
        reference_rows,
        resource_id,
        (lambda row: _local_patient_id(row, ())) if local_only else _any_patient_id,
    )


def _any_patient_id(row: ReferenceRow) -> str | None:
    """The id of the patient ``row`` targets, on this server or any other."""
    return row.target_id if row.target_type == "Patient" and row.target_id else None


def _patients(
    params: tuple[str, ...],
    resource_type: str,
    reference_rows: Iterable[IndexRow],
    resource_id: str | None,
    patient_of: Callable[[ReferenceRow], str | None],
) -> set[str]:
    found: set[str] = set()
    if resource_type == "Patient" and resource_id:
        found.add(resource_id)
    if not params:
        return found
    for row in reference_rows:
        if isinstance(row, ReferenceRow) and row.param in params and (patient := patient_of(row)) is not None:
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
