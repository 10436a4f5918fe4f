"""The access policy: SMART scopes, then the patients a restricted caller reaches.

https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html and
https://hl7.org/fhir/R4/compartmentdefinition-patient.html. A restricted caller reaches the resources
that belong to one of its patients: the launch patient for a ``patient/`` token, or the patients of a
practitioner's care teams and episodes of care for a ``user/`` token. How a resource of each type
belongs to a patient is :mod:`fhir_norse.auth.compartment`'s table (:func:`~.compartment.reach_of`):
the R4 Patient compartment, extended by this server for Task and Binary; shared definitional and
directory types (Questionnaire, CodeSystem, Practitioner, ...) are read as the scopes allow but
written only with system access; any other type (Subscription) is out of a restricted caller's reach.

The one rule, applied by the repository (:mod:`fhir_norse.server.repository`) on every path:

* scopes that do not allow the interaction on the type at all, or a type a restricted caller never
  reaches: **403** (nothing about any resource is revealed by that);
* an existing resource, or a patient an operation names, out of reach: **404**, the same answer as for
  one that does not exist;
* new content that would put a resource into the compartment of any patient the caller does not reach
  (or a shared type written by a restricted caller): **403**, whether or not its target exists.

Searches see only what is within reach, and so do the sources of their ``_has`` and the targets of
their chains (:meth:`AccessPolicy.restrict_search`); ``_include``/``_revinclude`` results pass the
rule of a read, history entries too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

import orjson
import sqlalchemy as sa

from fhir_norse.auth.caller import Access, Authorizer, Caller
from fhir_norse.auth.compartment import (
    Reach,
    context_rows,
    membership_params,
    patients_belonging,
    reach_of,
    searchable,
    security_context,
)
from fhir_norse.outcomes import Forbidden, NotFound
from fhir_norse.store.rows import IndexRow, ReferenceRow
from fhir_norse.store.search.request import (
    AnyCriterion,
    ChainCriterion,
    CompartmentCriterion,
    HasCriterion,
    SearchRequest,
)
from fhir_norse.store.tables import ReferenceIndex, ResourceRow

REF: sa.Table = ReferenceIndex.__table__  # type: ignore[attr-defined]
RES: sa.Table = ResourceRow.__table__  # type: ignore[attr-defined]
# Built once (a read runs it every time): no statement construction or cache key per call.
_STORED_REFERENCES = sa.select(
    REF.c.param, REF.c.target_type, REF.c.target_id, REF.c.target_version, REF.c.url
).where(REF.c.resource_pk == sa.bindparam("pk"))

# The patients a caller reaches for searching a type (None: all); raises Forbidden as a grant does.
SearchReach = Callable[[str], frozenset[str] | None]


class AccessPolicy:
    """The one access decision of this server (module doc). Only the repository asks it."""

    def __init__(self, authorizer: Authorizer | None = None) -> None:
        self._authorizer = authorizer or Authorizer()

    def grant(self, caller: Caller, interaction: str, resource_type: str | None) -> Access:
        """The caller's access for ``interaction`` on ``resource_type`` (403 when its scopes do not
        allow it, or when it is restricted and the type is one restricted callers never reach)."""
        access = self._authorizer.check(caller, interaction, resource_type)
        if access.restricted and resource_type is not None and reach_of(resource_type) is Reach.NONE:
            raise Forbidden(
                f"{resource_type} resources belong to no patient: a patient/ or user/ token cannot reach them"
            )
        return access

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
    def restricts(res_type: str) -> bool:
        """Whether a restricted caller reaches resources of ``res_type`` only through its patients
        (every type but the shared ones)."""
        return reach_of(res_type) is not Reach.SHARED

    @staticmethod
    def patients_of(res_type: str, res_id: str | None, rows: Iterable[IndexRow]) -> set[str]:
        """The patients the resource belongs to (its rows, with :meth:`context_rows` for a Binary)."""
        return patients_belonging(res_type, rows, resource_id=res_id)

    @staticmethod
    def stored_reference_rows(conn: sa.Connection, resource_pk: int) -> list[ReferenceRow]:
        """The reference index rows of a stored resource (its current version)."""
        result = conn.execute(_STORED_REFERENCES, {"pk": resource_pk})
        return [ReferenceRow(p, t, i, v, u) for p, t, i, v, u in result]

    def context_rows(
        self, conn: sa.Connection, res_type: str, body: Mapping[str, Any] | str | None
    ) -> list[ReferenceRow]:
        """For a Binary, rows placing it with the patients of the resource its securityContext names
        (:data:`~fhir_norse.auth.compartment.SECURITY_CONTEXT`); nothing for other types. The named
        resource's own rows decide, one step deep: a Binary naming a Binary belongs to no one."""
        if body is None or searchable(res_type):  # only a Binary is placed by its content, not its index
            return []
        content = orjson.loads(body) if isinstance(body, str) else body
        context = security_context(res_type, content) if isinstance(content, Mapping) else None
        if context is None:
            return []
        context_type, context_id = context
        if context_type == "Patient":
            return context_rows([context_id])
        if reach_of(context_type) is not Reach.PATIENTS or not searchable(context_type):
            return []
        pk = conn.execute(
            sa.select(RES.c.pk).where(
                RES.c.res_type == context_type, RES.c.res_id == context_id, RES.c.deleted.is_(False)
            )
        ).scalar_one_or_none()
        if pk is None:
            return []
        rows = self.stored_reference_rows(conn, pk)
        return context_rows(self.patients_of(context_type, context_id, rows))

    def visible(
        self, res_type: str, res_id: str | None, rows: Iterable[IndexRow], patients: frozenset[str] | None
    ) -> bool:
        """May a caller who reaches ``patients`` (None: all) see this resource?"""
        if patients is None:
            return True
        reach = reach_of(res_type)
        if reach is Reach.SHARED:
            return True
        return reach is Reach.PATIENTS and bool(self.patients_of(res_type, res_id, rows) & patients)

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
        """A restricted caller writes only resources that belong to its patients and to no other: every
        patient a compartment reference names (local or absolute, since a reference search matches
        both) must be one it reaches, so nothing lands in another patient's record."""
        if patients is None:
            return
        if reach_of(res_type) is not Reach.PATIENTS:
            raise Forbidden(f"Only system access may write {res_type} resources")
        rows = list(rows)
        named = patients_belonging(res_type, rows, resource_id=res_id, local_only=False)
        if not self.patients_of(res_type, res_id, rows) or not named <= patients:
            raise Forbidden(
                f"The {res_type} must belong to a patient this access token reaches, and to no other"
            )

    @staticmethod
    def search_restriction(res_type: str, patients: frozenset[str] | None) -> CompartmentCriterion | None:
        """The compartment criterion a search of ``res_type`` by a caller who reaches ``patients`` must
        match; None when it need not (unrestricted caller, shared type). A type whose membership is no
        search parameter (Binary) or that belongs to no patient matches nothing."""
        if patients is None or reach_of(res_type) is Reach.SHARED:
            return None
        params = membership_params(res_type) if searchable(res_type) else ()
        return CompartmentCriterion(res_type, params, patients)

    def restrict_search(
        self, request: SearchRequest, patients: frozenset[str] | None, reach: SearchReach
    ) -> SearchRequest:
        """``request`` limited to what the caller reaches: its matches (to ``patients``), the sources of
        each ``_has`` and the targets of each chain (to what ``reach`` gives for their types).

        ``_has`` and chains are restricted rather than refused: with their sources and targets limited
        to what the caller may search itself, ``Organization?_has:Patient:organization:name=X`` can only
        ever observe the caller's own patients, so it is no existence oracle for anyone else's, while a
        patient's ``Patient?_has:Observation:subject:code=X`` over its own data keeps working. A
        ``_has`` over a type the scopes do not allow searching is refused (403); a chain hop into such
        a type matches nothing, and a chain with no hop left is refused.
        """
        if patients is not None and not searchable(request.resource_type):
            raise Forbidden(
                f"A patient/ or user/ token reads {request.resource_type} resources by id: what they "
                "belong to is no search parameter"
            )
        if patients is None and not any(
            isinstance(c, HasCriterion | ChainCriterion) for c in request.criteria
        ):
            return request
        criteria = [self._restrict_criterion(c, reach) for c in request.criteria]
        own = self.search_restriction(request.resource_type, patients)
        if own is not None:
            criteria.append(own)
        return replace(request, criteria=tuple(criteria))

    def _restrict_criterion(self, criterion: AnyCriterion, reach: SearchReach) -> AnyCriterion:
        if isinstance(criterion, HasCriterion):
            source = criterion.source_type
            return replace(criterion, restriction=self.search_restriction(source, reach(source)))
        if not isinstance(criterion, ChainCriterion):
            return criterion
        restrictions: list[CompartmentCriterion] = []
        refusals: list[Forbidden] = []
        for hop in criterion.hops:
            try:
                patients = reach(hop.resource_type)
            except Forbidden as refusal:
                refusals.append(refusal)
                restrictions.append(CompartmentCriterion(hop.resource_type, (), frozenset()))  # no match
                continue
            if (restriction := self.search_restriction(hop.resource_type, patients)) is not None:
                restrictions.append(restriction)
        if len(refusals) == len(criterion.hops):
            raise refusals[0]
        return replace(criterion, restrictions=tuple(restrictions))
