"""The caller of a request and the one authorization seam every interaction passes.

Every FHIR interaction asks :meth:`Authorizer.check` before it touches data. The caller is
built from a verified access token (SMART on FHIR) by :mod:`fhir_norse.api.deps`; the answer
says whether the caller reaches everything its scopes name or only some patients' compartments.
See https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fhir_norse.auth.scopes import ScopeSet
from fhir_norse.outcomes import Forbidden


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
        return cls(client_id="local-operator", scopes=frozenset({"system/*.cruds"}), source="local")


@dataclass(frozen=True, slots=True)
class Access:
    """What a granted interaction may reach.

    ``patient`` set: only that patient's compartment (a ``patient/`` scope); ``practitioner``
    set: only the compartments of the patients in that practitioner's care (a ``user/`` scope);
    neither: whatever the scopes name (a ``system/`` scope).
    """

    patient: str | None = None
    practitioner: str | None = None

    @property
    def restricted(self) -> bool:
        return self.patient is not None or self.practitioner is not None


UNRESTRICTED = Access()


class Authorizer:
    """Decides whether ``caller`` may perform ``interaction`` on ``resource_type``, and how far."""

    def check(self, caller: Caller, interaction: str, resource_type: str | None) -> Access:
        scopes = ScopeSet.parse(caller.scopes)
        permission = ScopeSet.permission_for(interaction)
        contexts = scopes.granting_contexts(resource_type or "*", permission)
        if "system" in contexts:
            return UNRESTRICTED
        if "user" in contexts and caller.practitioner is not None:
            return Access(practitioner=caller.practitioner)
        if "patient" in contexts and caller.patient is not None:
            return Access(patient=caller.patient)
        target = resource_type or "all resource types"
        raise Forbidden(
            f"The access token's scopes do not allow '{interaction}' on {target}", code="forbidden"
        )
