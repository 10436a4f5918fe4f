"""SMART on FHIR clinical scopes: parsing, checking an interaction, and scope escalation.

Implements https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html (SMART App
Launch 2.x) for resource access:

* v2 scopes ``context/Type.perms[?param=value&...]``: ``context`` is ``patient``, ``user`` or
  ``system``; ``Type`` a resource type or ``*``; ``perms`` a non-empty subset of ``cruds`` in that
  order (``.dus`` or ``.rr`` are malformed, as the page allows us to refuse them);
* v1 scopes ``context/Type.read`` (= ``rs``), ``.write`` (= ``cud``) and ``.*`` (= ``cruds``), the
  equivalences the page prescribes (``permission-v1``);
* identity, launch and refresh scopes (``openid``, ``fhirUser``, ``launch/patient``,
  ``offline_access``...) grant no resource access; they are kept apart in :attr:`ScopeSet.other`;
* anything else (unknown words, malformed clinical scopes, a v1 suffix with a query) lands in
  :attr:`ScopeSet.invalid` and grants nothing, so the token endpoint can answer ``invalid_scope``.

Granular scopes (``patient/Observation.rs?category=...``) are parsed and exposed as
:attr:`ResourceScope.restrictions`, but :meth:`ScopeSet.allows` never counts them: a restricted
scope grants access only to the resources its query matches, and deciding that needs the
search engine. Callers that want to honour them ask :meth:`ScopeSet.restricted_scopes` and add
the query to the search; until they do, a granular scope simply grants nothing (fail closed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from urllib.parse import unquote

CONTEXTS: tuple[str, ...] = ("patient", "user", "system")
PERMISSIONS = "cruds"
WILDCARD = "*"

# v1 suffixes and what the SMART 2 page says they mean in v2.
V1_PERMISSIONS: Mapping[str, str] = MappingProxyType({"read": "rs", "write": "cud", "*": "cruds"})

# Scopes that are valid but concern identity, launch context or refresh tokens, not resources.
NON_RESOURCE_SCOPES: frozenset[str] = frozenset(
    {
        "openid",
        "profile",
        "fhirUser",
        "launch",
        "launch/patient",
        "launch/encounter",
        "offline_access",
        "online_access",
    }
)

# Interaction (as the authorization seam names it) -> the SMART permission it needs. Follows the
# permission list of the SMART 2 page: ``r`` covers read, vread and *instance* history; ``s``
# covers type and system search and history; ``u`` covers update (also when the update creates
# the resource, "allowed by the update scope") and patch. ``history`` without a level means type
# or system history (the broader one) and so needs ``s``; pass ``history-instance`` for
# ``Type/id/_history``. Conditional create, update and delete need only c, u and d: the search
# they run is part of the write and its matches are never returned. Operations are named
# ``operation:<code>``; $validate reads nothing from the store but is classed as ``r`` so a
# read-only client may validate.
INTERACTION_PERMISSIONS: Mapping[str, str] = MappingProxyType(
    {
        "read": "r",
        "vread": "r",
        "history-instance": "r",
        "search": "s",
        "search-type": "s",
        "search-system": "s",
        "history": "s",
        "history-type": "s",
        "history-system": "s",
        "create": "c",
        "update": "u",
        "patch": "u",
        "delete": "d",
        "operation:validate": "r",
        # SDC $extract shows what scoring a response would write; it stores nothing.
        "operation:extract": "r",
        # Adaptive administration reads the patient's history and writes nothing.
        "operation:next-question": "r",
        "operation:tailored-form": "r",
        "operation:populate": "r",
        "operation:adaptive-state": "r",
        # The clinician's feedback report (issue 17) reads the patient's record and writes nothing.
        "operation:report": "r",
    }
)

# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")
_CLINICAL = re.compile(
    r"^(?P<context>patient|user|system)/(?P<type>\*|[A-Z][A-Za-z]{0,63})\.(?P<perms>[a-z*]+)"
    r"(?:\?(?P<query>.*))?$"
)
_V2_PERMS = re.compile(r"^c?r?u?d?s?$")
# A search parameter name, possibly with a modifier or a chain (``code:in``, ``patient.birthdate``).
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-.:]*$")


class InvalidScope(ValueError):
    """A scope string that is neither a SMART clinical scope nor a known non-resource scope."""


@dataclass(frozen=True, slots=True)
class ResourceScope:
    """One clinical scope, normalised to v2 permissions.

    ``restrictions`` holds the ``param=value`` pairs of a granular scope, percent-decoded and
    sorted; it is empty for a scope on the whole type.
    """

    context: str
    resource_type: str
    permissions: frozenset[str]
    restrictions: tuple[tuple[str, str], ...] = ()
    # The scope as written, for echoing back in a token response.
    text: str = field(default="", compare=False)

    @classmethod
    def parse(cls, text: str) -> ResourceScope:
        """Parse one clinical scope; :class:`InvalidScope` when it is not one."""
        if not _SCOPE_TOKEN.match(text):
            raise InvalidScope(f"'{text}' contains characters a scope may not contain")
        match = _CLINICAL.match(text)
        if match is None:
            raise InvalidScope(f"'{text}' is not of the form context/Type.permissions")
        perms, query = match["perms"], match["query"]
        if perms in V1_PERMISSIONS:
            if query is not None:
                # Granular restrictions are a v2 feature; a v1 suffix with one is a mix we would
                # have to guess the meaning of.
                raise InvalidScope(f"'{text}': a v1 scope (.{perms}) cannot carry a query")
            perms = V1_PERMISSIONS[perms]
        elif not perms or not _V2_PERMS.match(perms):
            raise InvalidScope(f"'{text}': permissions must be a subset of 'cruds' in that order")
        restrictions = () if query is None else _parse_query(text, query)
        return cls(match["context"], match["type"], frozenset(perms), restrictions, text)

    @property
    def restricted(self) -> bool:
        return bool(self.restrictions)

    def matches_type(self, resource_type: str) -> bool:
        """Whether this scope is about ``resource_type`` (``*`` matches only a ``*`` scope)."""
        return self.resource_type == WILDCARD or self.resource_type == resource_type

    def covers(self, other: ResourceScope) -> bool:
        """Whether this scope alone grants everything ``other`` grants.

        Restrictions are ANDed conditions, so a scope covers a narrower one whose restrictions
        include all of its own.
        """
        return (
            self.context == other.context
            and self.matches_type(other.resource_type)
            and other.permissions <= self.permissions
            and set(self.restrictions) <= set(other.restrictions)
        )


def _parse_query(text: str, query: str) -> tuple[tuple[str, str], ...]:
    pairs: set[tuple[str, str]] = set()
    for part in query.split("&"):
        name, eq, value = part.partition("=")
        name, value = unquote(name), unquote(value)
        if not eq or not value or not _PARAM_NAME.match(name):
            raise InvalidScope(f"'{text}': the query must be param=value pairs joined by '&'")
        pairs.add((name, value))
    return tuple(sorted(pairs))


def _contexts(contexts: str | Iterable[str]) -> tuple[str, ...]:
    # A lone string is one context, not the characters of one.
    return (contexts,) if isinstance(contexts, str) else tuple(contexts)


def _check_permission(permission: str) -> None:
    if len(permission) != 1 or permission not in PERMISSIONS:
        raise ValueError(f"unknown SMART permission {permission!r}; expected one of {PERMISSIONS!r}")


@dataclass(frozen=True, slots=True)
class ScopeSet:
    """The scopes of a token or a request, parsed once (see the module docstring for the rules).

    Immutable and cached by :meth:`parse`, so one instance may serve every request of a token.
    """

    resource: tuple[ResourceScope, ...] = ()
    # Valid scopes that grant no resource access (identity, launch context, refresh tokens).
    other: frozenset[str] = frozenset()
    # Unknown or malformed scopes, as written.
    invalid: frozenset[str] = frozenset()
    # (context, type, permission) triples granted by unrestricted scopes: the per-request check
    # is a few set look-ups.
    _grants: frozenset[tuple[str, str, str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        grants = frozenset(
            (s.context, s.resource_type, p) for s in self.resource if not s.restricted for p in s.permissions
        )
        object.__setattr__(self, "_grants", grants)

    @staticmethod
    def parse(scopes: str | Iterable[str]) -> ScopeSet:
        """Parse a space-separated scope string or an iterable of scope strings (cached)."""
        items = scopes.split() if isinstance(scopes, str) else [s for scope in scopes for s in scope.split()]
        return _parse_cached(frozenset(items))

    # -- checking an interaction ------------------------------------------------------------------

    @staticmethod
    def permission_for(interaction: str) -> str:
        """The SMART permission (one of ``cruds``) an interaction needs; see
        :data:`INTERACTION_PERMISSIONS`. Batch, transaction and capabilities have none (a
        Bundle is checked entry by entry; ``/metadata`` is public): asking for them, or for an
        unknown interaction, is a programming error and raises :class:`ValueError`."""
        try:
            return INTERACTION_PERMISSIONS[interaction]
        except KeyError:
            raise ValueError(f"no SMART permission is defined for interaction {interaction!r}") from None

    def allows(self, contexts: str | Iterable[str], resource_type: str, permission: str) -> bool:
        """Whether an unrestricted scope in one of ``contexts`` grants ``permission`` on
        ``resource_type``. Pass ``"*"`` as the type to ask whether *every* type is granted
        (system-level search or history without ``_type``)."""
        _check_permission(permission)
        grants = self._grants
        return any(
            (context, resource_type, permission) in grants or (context, WILDCARD, permission) in grants
            for context in _contexts(contexts)
        )

    def allows_interaction(self, contexts: str | Iterable[str], resource_type: str, interaction: str) -> bool:
        """:meth:`allows` with the permission :meth:`permission_for` gives ``interaction``."""
        return self.allows(contexts, resource_type, self.permission_for(interaction))

    def granting_contexts(self, resource_type: str, permission: str) -> frozenset[str]:
        """The contexts whose unrestricted scopes grant ``permission`` on ``resource_type``.

        The seam picks the widest: ``system`` (no compartment), then ``user`` (the
        practitioner's patients), then ``patient`` (the launch patient's compartment)."""
        return frozenset(c for c in CONTEXTS if self.allows(c, resource_type, permission))

    def resource_types(self, contexts: str | Iterable[str], permission: str) -> frozenset[str]:
        """The types unrestricted scopes in ``contexts`` grant ``permission`` on; contains
        ``"*"`` when a wildcard scope grants every type (to filter ``_include`` or system search)."""
        _check_permission(permission)
        wanted = set(_contexts(contexts))
        return frozenset(t for c, t, p in self._grants if c in wanted and p == permission)

    def restricted_scopes(
        self, contexts: str | Iterable[str], resource_type: str, permission: str
    ) -> tuple[ResourceScope, ...]:
        """Granular scopes that would grant ``permission`` on ``resource_type`` to the resources
        their query matches. :meth:`allows` ignores them; a caller may apply their
        ``restrictions`` as extra search criteria."""
        _check_permission(permission)
        wanted = set(_contexts(contexts))
        return tuple(
            s
            for s in self.resource
            if s.restricted
            and s.context in wanted
            and s.matches_type(resource_type)
            and permission in s.permissions
        )

    def contexts(self) -> frozenset[str]:
        """Which of ``patient``, ``user`` and ``system`` appear in the clinical scopes."""
        return frozenset(s.context for s in self.resource)

    # -- comparing scope sets -----------------------------------------------------------------------

    def covers(self, requested: ScopeSet) -> bool:
        """Whether these (allowed) scopes grant everything ``requested`` asks for.

        Each permission of each requested clinical scope must be granted by some allowed scope
        of the same context (``system/*.cruds`` covers ``system/Observation.rs``;
        ``system/Observation.r system/Observation.s`` together cover ``system/Observation.rs``);
        each requested non-resource scope must be allowed as such; any invalid requested scope
        makes the answer False. Used by the token endpoint to refuse scope escalation.
        """
        if requested.invalid or not requested.other <= self.other:
            return False
        for wanted in requested.resource:
            for permission in wanted.permissions:
                single = ResourceScope(
                    wanted.context, wanted.resource_type, frozenset(permission), wanted.restrictions
                )
                if not any(have.covers(single) for have in self.resource):
                    return False
        return True

    def text(self) -> str:
        """The valid scopes as a space-separated string, in a stable order (for a token response)."""
        return " ".join(sorted({s.text for s in self.resource} | self.other))


@lru_cache(maxsize=1024)
def _parse_cached(items: frozenset[str]) -> ScopeSet:
    resource: list[ResourceScope] = []
    other: set[str] = set()
    invalid: set[str] = set()
    for item in items:
        if item in NON_RESOURCE_SCOPES:
            other.add(item)
            continue
        try:
            resource.append(ResourceScope.parse(item))
        except InvalidScope:
            invalid.add(item)
    resource.sort(key=lambda s: s.text)
    return ScopeSet(tuple(resource), frozenset(other), frozenset(invalid))
