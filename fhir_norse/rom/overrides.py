"""Clinician scale overrides (ServiceRequest ``rom-scale-override``), checked before storage on every path."""

from __future__ import annotations

from fhir_norse.canonicals import CS_SCALES
from fhir_norse.instruments.registry import InstrumentRegistry
from fhir_norse.instruments.schema import InstrumentMapping
from fhir_norse.outcomes import Issue, Unprocessable
from fhir_norse.rom.patient import is_override
from fhir_norse.server.repository import JsonDict, Repository, StorageHook
from fhir_norse.server.resources import reference_id
from fhir_norse.store.storage import StoredResource


class ScaleOverrideHook(StorageHook):
    """Checks clinician overrides (ServiceRequest ``rom-scale-override``) before they are stored; other
    ServiceRequests pass untouched."""

    def __init__(self, registry: InstrumentRegistry) -> None:
        self.registry = registry

    def before_storage(
        self, repo: Repository, res_id: str, body: JsonDict, previous: StoredResource | None
    ) -> None:
        if not is_override(body):
            return
        issues: list[Issue] = []
        scales = {
            s.code
            for i in self.registry
            if isinstance(i.mapping, InstrumentMapping)
            for s in i.mapping.scales
        }
        codes = [c for c in (body.get("code") or {}).get("coding") or [] if c.get("system") == CS_SCALES]
        if len(codes) != 1 or codes[0].get("code") not in scales:
            given = ", ".join(str(c.get("code")) for c in codes) or "none"
            issues.append(
                Issue(
                    f"A scale override names exactly one scale of {CS_SCALES} in code (given: {given}; "
                    f"known: {', '.join(sorted(scales))})",
                    code="code-invalid",
                    expression=("ServiceRequest.code",),
                )
            )
        patient_id = reference_id((body.get("subject") or {}).get("reference"), "Patient")
        patient = repo.as_server().get("Patient", patient_id) if patient_id else None
        if patient is None:
            issues.append(
                Issue(
                    "subject must reference a Patient on this server",
                    code="not-found" if patient_id else "required",
                    expression=("ServiceRequest.subject",),
                )
            )
        if not (body.get("requester") or {}).get("reference"):
            issues.append(
                Issue(
                    "requester (the clinician who decides) is required on a scale override",
                    code="required",
                    expression=("ServiceRequest.requester",),
                )
            )
        if not body.get("authoredOn"):
            issues.append(
                Issue(
                    "authoredOn (when the decision was made) is required on a scale override",
                    code="required",
                    expression=("ServiceRequest.authoredOn",),
                )
            )
        has_reason = any(r.get("text") or r.get("coding") for r in body.get("reasonCode") or []) or any(
            n.get("text") for n in body.get("note") or []
        )
        if not has_reason:
            issues.append(
                Issue(
                    "a reason (reasonCode.text or note) is required on a scale override",
                    code="required",
                    expression=("ServiceRequest.reasonCode",),
                )
            )
        if "doNotPerform" not in body:
            issues.append(
                Issue(
                    "doNotPerform must say the direction: false forces the scale open, true forces it closed",
                    code="required",
                    expression=("ServiceRequest.doNotPerform",),
                )
            )
        if body.get("intent") not in ("order", "plan", "directive", "original-order"):
            issues.append(
                Issue(
                    "intent of a scale override is 'order'",
                    code="value",
                    expression=("ServiceRequest.intent",),
                )
            )
        if issues:
            raise Unprocessable(issues[0].diagnostics, issues=issues)
