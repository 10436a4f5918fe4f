"""The access policy: SMART scopes, then the patient compartments of a restricted caller.

https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html and
https://hl7.org/fhir/R4/compartmentdefinition-patient.html. A restricted caller reaches a resource of a
compartment type only when it is in the compartment of one of its patients: the launch patient for a
``patient/`` token, or the patients of a practitioner's care teams and episodes of care for a ``user/``
token. Resource types outside the compartment (Questionnaire, CodeSystem, ...) can be read as the
scopes allow, but only ``system/`` access may write them.

The one rule, applied by the repository (:mod:`fhir_norse.server.repository`) on every path:

* scopes that do not allow the interaction on the type at all: **403** (nothing about any resource is
  revealed by that);
* an existing resource, or a patient an operation names, out of reach: **404**, the same answer as for
  one that does not exist;
* new content that would put a resource outside the caller's compartments (or a type outside the
  compartment written by a restricted caller): **403**, whether or not its target exists.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa

from fhir_norse.auth.caller import Access, Authorizer, Caller
from fhir_norse.auth.compartment import (
    in_compartment_types,
    patient_compartment_params,
    patients_referenced,
)
from fhir_norse.outcomes import Forbidden, NotFound
from fhir_norse.store.rows import IndexRow, ReferenceRow
from fhir_norse.store.tables import ReferenceIndex, ResourceRow

REF: sa.Table = ReferenceIndex.__table__  # type: ignore[attr-defined]
RES: sa.Table = ResourceRow.__table__  # type: ignore[attr-defined]


class AccessPolicy:
    """The one access decision of this server (module doc). Only the repository asks it."""

    def __init__(self, authorizer: Authorizer | None = None) -> None:
        self._authorizer = authorizer or Authorizer()

    def grant(self, caller: Caller, interaction: str, resource_type: str | None) -> Access:
        """The caller's access for ``interaction`` on ``resource_type`` (403 when its scopes do not
        allow it)."""
        return self._authorizer.check(caller, interaction, resource_type)

    @staticmethod
    def reachable(conn: sa.Connection, access: Access) -> frozenset[str] | None:
        """The patient ids a restricted caller reaches; None for unrestricted access.

        A practitioner reaches the patients of every CareTeam that names them as a participant and
        of every EpisodeOfCare that names them as care manager.
        """
        if access.patient is not None:
            return frozenset({access.patient})
        if access.practitioner is None:
            return None
        teams = sa.select(REF.c.resource_pk).where(
            REF.c.res_type.in_(("CareTeam", "EpisodeOfCare")),
            REF.c.param.in_(("participant", "care-manager")),
            REF.c.target_type == "Practitioner",
            REF.c.target_id == access.practitioner,
            REF.c.url.is_(None),
        )
        live = sa.select(RES.c.pk).where(RES.c.deleted.is_(False))
        patients = conn.execute(
            sa.select(REF.c.target_id)
            .distinct()
            .where(
                REF.c.resource_pk.in_(teams),
                REF.c.resource_pk.in_(live),
                REF.c.param == "patient",
                REF.c.target_type == "Patient",
                REF.c.url.is_(None),
            )
        ).scalars()
        return frozenset(p for p in patients if p)

    @staticmethod
    def is_compartment_type(res_type: str) -> bool:
        return res_type in in_compartment_types()

    @staticmethod
    def patients_of(res_type: str, res_id: str | None, rows: Iterable[IndexRow]) -> set[str]:
        return patients_referenced(res_type, rows, resource_id=res_id)

    @staticmethod
    def stored_reference_rows(conn: sa.Connection, resource_pk: int) -> list[ReferenceRow]:
        """The reference index rows of a stored resource (its current version)."""
        result = conn.execute(
            sa.select(REF.c.param, REF.c.target_type, REF.c.target_id, REF.c.target_version, REF.c.url).where(
                REF.c.resource_pk == resource_pk
            )
        )
        return [ReferenceRow(p, t, i, v, u) for p, t, i, v, u in result]

    def visible(
        self, res_type: str, res_id: str | None, rows: Iterable[IndexRow], patients: frozenset[str] | None
    ) -> bool:
        """May a caller who reaches ``patients`` (None: all) see this resource?"""
        if patients is None or not self.is_compartment_type(res_type):
            return True
        return bool(self.patients_of(res_type, res_id, rows) & patients)

    def require_visible(
        self, res_type: str, res_id: str, rows: Iterable[IndexRow], patients: frozenset[str] | None
    ) -> None:
        if not self.visible(res_type, res_id, rows, patients):
            # The same answer as for an id that does not exist: nothing is revealed.
            raise NotFound(f"{res_type}/{res_id} is not known")

    def require_writable(
        self,
        res_type: str,
        res_id: str | None,
        rows: Iterable[IndexRow],
        access: Access,
        patients: frozenset[str] | None,
    ) -> None:
        """A restricted caller writes only resources in its patients' compartments."""
        if patients is None:
            return
        if not self.is_compartment_type(res_type):
            raise Forbidden(f"Only system access may write {res_type} resources")
        if not self.patients_of(res_type, res_id, rows) & patients:
            raise Forbidden(f"The {res_type} must belong to a patient this access token reaches")

    def search_restriction(self, res_type: str, patients: frozenset[str] | None) -> tuple[str, ...] | None:
        """The compartment parameters a restricted search must match, or None when it need not."""
        if patients is None or not self.is_compartment_type(res_type):
            return None
        return patient_compartment_params(res_type)
