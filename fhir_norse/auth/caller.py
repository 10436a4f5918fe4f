"""The caller of a request and the one authorization seam every interaction passes.

Every FHIR interaction asks :meth:`Authorizer.check` before it touches data. Until SMART
on FHIR authorization lands (issue 3), the only caller is the local operator, allowed
everything; the seam is in place so that no route can skip it later.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: a client, a user or a patient, with the scopes they were granted."""

    client_id: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    patient: str | None = None
    practitioner: str | None = None

    @classmethod
    def operator(cls) -> Caller:
        return cls(client_id="local-operator", scopes=frozenset({"system/*.*"}))


class Authorizer:
    """Decides whether ``caller`` may perform ``interaction`` on ``resource_type``."""

    def check(self, caller: Caller, interaction: str, resource_type: str | None) -> None:
        # Issue 3 replaces this with scope and compartment checks; every call site exists now.
        return None
