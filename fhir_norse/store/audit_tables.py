"""The audit trail as narrow append-only rows (issue 14, lever 1; revision ``0003``).

One ``audit_log`` row per recorded access holds what its AuditEvent is rendered from
(:class:`fhir_norse.auth.audit.AuditInputs`: no FHIR body, no search-index rows), with the columns
the AuditEvent search reads; one ``audit_patient`` row per patient concerned (a patient entity, or
the patient acting) finds the events of a patient (``AuditEvent?patient=``, the compartment).
Events stored as resources before this revision keep their body in ``legacy_body``.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from fhir_norse.store.tables import METADATA

__all__ = ["AUDIT_LOG", "AUDIT_PATIENT", "legacy_columns"]

_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

AUDIT_LOG = sa.Table(
    "audit_log",
    METADATA,
    sa.Column("pk", _PK, primary_key=True, autoincrement=True),
    # The AuditEvent's id.
    sa.Column("id", sa.String(64), nullable=False),
    # Naive UTC (the event's ``recorded``, also its ``meta.lastUpdated``).
    sa.Column("recorded", sa.DateTime(), nullable=False),
    # rest | token-grant | authentication | legacy
    sa.Column("kind", sa.String(16), nullable=False),
    # rest: the interaction (``read``, ``operation:validate``); token-grant: the grant type.
    sa.Column("interaction", sa.String(80), nullable=True),
    # The R4 outcome code: 0, 4 or 8.
    sa.Column("outcome", sa.String(2), nullable=False),
    sa.Column("action", sa.String(1), nullable=True),
    sa.Column("client", sa.String(256), nullable=True),
    # The user agent's ``who`` reference (``Practitioner/x``, ``Patient/y``).
    sa.Column("user_ref", sa.String(200), nullable=True),
    # The access token's jti (``agent.policy``).
    sa.Column("jti", sa.String(256), nullable=True),
    # The client's network address.
    sa.Column("address", sa.String(256), nullable=True),
    # The resource acted on.
    sa.Column("entity_type", sa.String(64), nullable=True),
    sa.Column("entity_id", sa.String(64), nullable=True),
    sa.Column("entity_version", sa.String(64), nullable=True),
    # The patient entities in order, space-separated (audit_patient is their search index).
    sa.Column("patients", sa.Text(), nullable=True),
    sa.Column("query", sa.Text(), nullable=True),
    # The rare parts of the inputs (user identifier, request id, failure reason, scopes, server, repeats).
    sa.Column("extra", sa.JSON(), nullable=True),
    # An AuditEvent stored as a resource before revision 0003, as it was stored.
    sa.Column("legacy_body", sa.JSON(), nullable=True),
    sa.Index("ux_audit_log_id", "id", unique=True),
    sa.Index("ix_audit_log_recorded", "recorded", "pk"),
    sa.Index("ix_audit_log_entity", "entity_type", "entity_id"),
    sa.Index("ix_audit_log_user", "user_ref"),
    sa.Index("ix_audit_log_client", "client"),
    sa.Index("ix_audit_log_jti", "jti"),
)

AUDIT_PATIENT = sa.Table(
    "audit_patient",
    METADATA,
    sa.Column("patient_id", sa.String(64), primary_key=True),
    sa.Column("audit_pk", _PK, primary_key=True, autoincrement=False),
)


_JTI_PREFIX = "urn:ietf:params:oauth:jti:"
_CLIENT_SYSTEM = "urn:fhir-norse:client"
_OPERATION_SYSTEM = "urn:fhir-norse:operation"
_RESTFUL = "http://hl7.org/fhir/restful-interaction"


def _ref_parts(reference: object) -> list[str]:
    return reference.split("/") if isinstance(reference, str) else []


def legacy_columns(body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The search columns of an AuditEvent stored as a resource before revision 0003 (its body goes
    to ``legacy_body``), and the patients it concerns (entities and agents that are a Patient)."""
    codes = {(c.get("system"), c.get("code")) for c in body.get("subtype") or [] if isinstance(c, dict)}
    type_code = (body.get("type") or {}).get("code")
    interaction: str | None = None
    kind = "legacy"
    if type_code == "rest":
        kind = "rest"
        rest = next((code for system, code in codes if system == _RESTFUL), None)
        operation = next((code for system, code in codes if system == _OPERATION_SYSTEM), None)
        interaction = f"operation:{operation}" if rest == "operation" and operation else rest
    elif any(code == "ITI-71" for _, code in codes):
        kind = "token-grant"
    elif any(code == "110122" for _, code in codes):
        kind = "authentication"
    columns: dict[str, Any] = {
        "kind": kind,
        "interaction": interaction,
        "outcome": body.get("outcome") or "0",
    }
    columns["action"] = body.get("action")
    patients: dict[str, None] = {}
    agents = [a for a in body.get("agent") or [] if isinstance(a, dict)]
    for number, agent in enumerate(agents):
        who = agent.get("who") or {}
        identifier = who.get("identifier") or {}
        if identifier.get("system") == _CLIENT_SYSTEM and "client" not in columns:
            columns["client"] = str(identifier.get("value"))[:256]
        parts = _ref_parts(who.get("reference"))
        if len(parts) == 2 and "user_ref" not in columns:
            columns["user_ref"] = who["reference"][:200]
            if parts[0] == "Patient":
                patients[parts[1][:64]] = None
        for policy in agent.get("policy") or []:
            if isinstance(policy, str) and policy.startswith(_JTI_PREFIX) and "jti" not in columns:
                columns["jti"] = policy.removeprefix(_JTI_PREFIX)[:256]
        address = (agent.get("network") or {}).get("address")
        if number == 0 and isinstance(address, str):
            columns["address"] = address[:256]
    entity_patients: list[str] = []
    for entity in body.get("entity") or []:
        parts = _ref_parts((entity.get("what") or {}).get("reference") if isinstance(entity, dict) else None)
        role = (entity.get("role") or {}).get("code") if isinstance(entity, dict) else None
        if len(parts) in (2, 4) and role == "4" and "entity_type" not in columns:
            columns.update(entity_type=parts[0][:64], entity_id=parts[1][:64])
            columns["entity_version"] = parts[3][:64] if len(parts) == 4 else None
        elif len(parts) == 2 and parts[0] == "Patient":
            entity_patients.append(parts[1][:64])
            patients[parts[1][:64]] = None
    columns["patients"] = " ".join(entity_patients) or None
    return columns, list(patients)
