"""The caller of a request and the one authorization seam every interaction passes.

Every FHIR interaction asks :meth:`Authorizer.check` before it touches data. The caller is
built from a verified access token (SMART on FHIR) by :mod:`fhir_norse.api.deps`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: a client, maybe on behalf of a user or a patient, with the scopes granted.

    ``patient`` is the SMART launch context (``patient`` claim); ``practitioner`` the id of the
    Practitioner a ``user/`` token acts for; ``user`` the ``fhirUser``/``sub`` as given.
    """

    client_id: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    patient: str | None = None
    practitioner: str | None = None
    user: str | None = None
    # The access token's ``jti``, for the audit trail (never the token itself).
    token_id: str | None = None
    # Where the identity came from: "token" (ours), "oidc" (a hospital identity provider), "local".
    source: str = "token"

    @classmethod
    def operator(cls) -> Caller:
        """The local operator (CLI and in-process tools): every scope, no compartment."""
        return cls(client_id="local-operator", scopes=frozenset({"system/*.*"}), source="local")


class Authorizer:
    """Decides whether ``caller`` may perform ``interaction`` on ``resource_type``."""

    def check(self, caller: Caller, interaction: str, resource_type: str | None) -> None:
        # Replaced by scope and compartment checks (issue 3); every call site exists already.
        return None
