"""SMART scopes: https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html"""

from __future__ import annotations

import pytest

from fhir_norse.auth.scopes import INTERACTION_PERMISSIONS, ResourceScope, ScopeSet

# --- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "context", "resource_type", "permissions"),
    [
        ("system/Observation.rs", "system", "Observation", "rs"),
        ("patient/*.cruds", "patient", "*", "cruds"),
        ("user/QuestionnaireResponse.c", "user", "QuestionnaireResponse", "c"),
        ("user/Patient.s", "user", "Patient", "s"),
        ("system/Flag.ud", "system", "Flag", "ud"),
        # v1 equivalences
        ("patient/Observation.read", "patient", "Observation", "rs"),
        ("user/Observation.write", "user", "Observation", "cud"),
        ("system/*.*", "system", "*", "cruds"),
        ("patient/*.read", "patient", "*", "rs"),
    ],
)
def test_clinical_scopes_parse_to_v2_permissions(
    text: str, context: str, resource_type: str, permissions: str
) -> None:
    scope = ResourceScope.parse(text)
    assert (scope.context, scope.resource_type, scope.permissions) == (
        context,
        resource_type,
        frozenset(permissions),
    )
    assert scope.restrictions == ()
    assert scope.text == text


def test_v1_and_v2_forms_are_equivalent() -> None:
    assert ResourceScope.parse("patient/Observation.read") == ResourceScope.parse("patient/Observation.rs")
    assert ResourceScope.parse("user/*.write") == ResourceScope.parse("user/*.cud")
    assert ScopeSet.parse("system/*.*") == ScopeSet.parse("system/*.cruds")


@pytest.mark.parametrize(
    "text",
    [
        "patient/Observation.dus",  # out of order: the spec's own example of an undefined scope
        "patient/Observation.rr",  # repeated
        "patient/Observation.",  # no permissions
        "patient/Observation.x",
        "patient/Observation.RS",
        "patient/Observation.readwrite",
        "practitioner/Observation.rs",  # unknown context
        "Patient/Observation.rs",
        "patient/observation.rs",  # not a resource type name
        "patient/Observation",
        "patient/Observation.rs.x",
        "patient/Observation.read?category=x",  # a v1 suffix with a query
        "patient/Observation.rs?",  # an empty query
        "patient/Observation.rs?category",  # no value
        "patient/Observation.rs?category=",
        "patient/Observation.rs?=x",
        "patient/Observation.rs?category=a&&code=b",
        'patient/Observation.rs?code="x"',  # '"' is not a scope-token character (RFC 6749)
        "openid2",
        "launch/other",
        "*",
    ],
)
def test_malformed_scopes_are_invalid_and_grant_nothing(text: str) -> None:
    scopes = ScopeSet.parse(text)
    assert scopes.invalid == {text}
    assert scopes.resource == ()
    assert scopes.other == frozenset()
    assert not scopes.allows(("patient", "user", "system"), "Observation", "r")


def test_non_resource_scopes_are_kept_apart_and_grant_nothing() -> None:
    words = "openid fhirUser profile launch launch/patient launch/encounter offline_access online_access"
    scopes = ScopeSet.parse(words)
    assert scopes.other == frozenset(words.split())
    assert scopes.invalid == frozenset()
    assert scopes.resource == ()
    assert scopes.contexts() == frozenset()
    for permission in "cruds":
        assert not scopes.allows(("patient", "user", "system"), "Patient", permission)


def test_parse_accepts_a_string_or_an_iterable_and_is_cached() -> None:
    as_string = ScopeSet.parse("  system/Observation.rs   openid\tbogus ")
    as_list = ScopeSet.parse(["openid", "system/Observation.rs", "bogus"])
    assert as_string == as_list
    assert as_string is as_list  # one parse per distinct scope set
    assert as_string.invalid == {"bogus"}
    assert ScopeSet.parse(frozenset({"openid system/Observation.rs", "bogus"})) is as_string
    assert ScopeSet.parse("") == ScopeSet()


def test_contexts_lists_the_contexts_of_clinical_scopes() -> None:
    scopes = ScopeSet.parse("patient/*.rs user/Observation.c?category=survey launch/patient openid")
    assert scopes.contexts() == {"patient", "user"}
    assert ScopeSet.parse("system/*.cruds").contexts() == {"system"}


def test_text_echoes_the_valid_scopes_in_a_stable_order() -> None:
    scopes = ScopeSet.parse("system/Observation.read bogus openid system/Patient.rs")
    assert scopes.text() == "openid system/Observation.read system/Patient.rs"


# --- granular scopes -------------------------------------------------------------------------------


def test_granular_scopes_are_parsed_and_exposed() -> None:
    text = (
        "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|survey"
        "&code%3Ain=http%3A%2F%2Fexample.org%2FValueSet%2Fx"
    )
    scope = ResourceScope.parse(text)
    assert scope.restricted
    assert scope.restrictions == (
        ("category", "http://terminology.hl7.org/CodeSystem/observation-category|survey"),
        ("code:in", "http://example.org/ValueSet/x"),
    )
    assert scope.permissions == frozenset("rs")


def test_granular_scopes_grant_nothing_through_allows_but_are_offered_to_the_caller() -> None:
    scopes = ScopeSet.parse("patient/Observation.rs?category=survey")
    assert not scopes.allows("patient", "Observation", "r")
    assert not scopes.allows("patient", "Observation", "s")
    assert scopes.granting_contexts("Observation", "r") == frozenset()
    assert scopes.resource_types("patient", "r") == frozenset()
    (restricted,) = scopes.restricted_scopes("patient", "Observation", "s")
    assert restricted.restrictions == (("category", "survey"),)
    assert scopes.restricted_scopes("patient", "Observation", "c") == ()
    assert scopes.restricted_scopes("user", "Observation", "s") == ()
    assert scopes.restricted_scopes("patient", "Patient", "s") == ()


def test_a_wildcard_granular_scope_is_offered_for_every_type() -> None:
    scopes = ScopeSet.parse("user/*.rs?_security=http://terminology.hl7.org/CodeSystem/v3-Confidentiality|N")
    assert [s.resource_type for s in scopes.restricted_scopes(["user"], "Flag", "r")] == ["*"]


# --- checking ---------------------------------------------------------------------------------------


def test_allows_checks_context_type_and_permission() -> None:
    scopes = ScopeSet.parse("patient/Observation.rs user/QuestionnaireResponse.c")
    assert scopes.allows("patient", "Observation", "r")
    assert scopes.allows(["patient", "user"], "Observation", "s")
    assert not scopes.allows("patient", "Observation", "c")
    assert not scopes.allows("system", "Observation", "r")  # a patient scope is no system scope
    assert not scopes.allows("user", "Observation", "r")
    assert not scopes.allows("patient", "Patient", "r")
    assert scopes.allows("user", "QuestionnaireResponse", "c")
    assert not scopes.allows("user", "QuestionnaireResponse", "r")
    assert not scopes.allows((), "Observation", "r")


def test_a_context_passed_as_a_string_is_one_context() -> None:
    # "user" must not be read as the contexts "u", "s", "e", "r".
    assert ScopeSet.parse("user/*.r").allows("user", "Flag", "r")
    assert not ScopeSet.parse("user/*.r").allows("patient", "Flag", "r")


def test_wildcard_type_scopes_grant_every_type() -> None:
    scopes = ScopeSet.parse("system/*.rs")
    for resource_type in ("Patient", "Observation", "AuditEvent", "Questionnaire"):
        assert scopes.allows("system", resource_type, "r")
        assert scopes.allows("system", resource_type, "s")
        assert not scopes.allows("system", resource_type, "u")
    assert scopes.allows("system", "*", "s")  # every type at once: system search without _type


def test_asking_for_every_type_needs_a_wildcard_scope() -> None:
    scopes = ScopeSet.parse("system/Observation.s system/Patient.s")
    assert not scopes.allows("system", "*", "s")
    assert scopes.resource_types("system", "s") == {"Observation", "Patient"}
    assert ScopeSet.parse("system/*.s system/Flag.s").resource_types(["system"], "s") == {"*", "Flag"}


def test_granting_contexts_names_every_context_that_grants() -> None:
    scopes = ScopeSet.parse("patient/*.rs user/Observation.r system/Observation.rs")
    assert scopes.granting_contexts("Observation", "r") == {"patient", "user", "system"}
    assert scopes.granting_contexts("Observation", "s") == {"patient", "system"}
    assert scopes.granting_contexts("Patient", "r") == {"patient"}
    assert scopes.granting_contexts("Patient", "d") == frozenset()


def test_unknown_permissions_are_a_programming_error() -> None:
    scopes = ScopeSet.parse("system/*.cruds")
    for bad in ("read", "x", "", "rs"):
        with pytest.raises(ValueError, match="SMART permission"):
            scopes.allows("system", "Observation", bad)


def test_operator_scopes_grant_everything() -> None:
    from fhir_norse.auth.caller import Caller

    scopes = ScopeSet.parse(Caller.operator().scopes)
    for permission in "cruds":
        assert scopes.allows("system", "AuditEvent", permission)


# --- interactions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interaction", "permission"),
    [
        ("read", "r"),
        ("vread", "r"),
        ("history-instance", "r"),
        ("search", "s"),
        ("search-type", "s"),
        ("search-system", "s"),
        ("history", "s"),
        ("history-type", "s"),
        ("history-system", "s"),
        ("create", "c"),
        ("update", "u"),
        ("patch", "u"),
        ("delete", "d"),
        ("operation:validate", "r"),
    ],
)
def test_permission_for_each_interaction(interaction: str, permission: str) -> None:
    assert ScopeSet.permission_for(interaction) == permission


def test_every_interaction_the_services_check_has_a_permission() -> None:
    # The names passed to Authorizer.check by fhir/interactions.py, bundles.py, searching.py
    # and operations/validate.py.
    used = {"read", "vread", "create", "update", "patch", "delete", "search-type", "history"}
    assert used <= INTERACTION_PERMISSIONS.keys()
    assert "operation:validate" in INTERACTION_PERMISSIONS


@pytest.mark.parametrize("interaction", ["batch", "transaction", "capabilities", "operation:unknown", "READ"])
def test_interactions_without_a_permission_raise(interaction: str) -> None:
    with pytest.raises(ValueError, match="no SMART permission"):
        ScopeSet.permission_for(interaction)


def test_allows_interaction_combines_both_steps() -> None:
    scopes = ScopeSet.parse("patient/Observation.r")
    assert scopes.allows_interaction("patient", "Observation", "vread")
    assert scopes.allows_interaction("patient", "Observation", "history-instance")
    assert not scopes.allows_interaction("patient", "Observation", "search-type")
    assert not scopes.allows_interaction("patient", "Observation", "history-type")


# --- scope escalation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "requested"),
    [
        ("system/*.cruds", "system/Observation.rs"),
        ("system/*.*", "system/*.rs system/Patient.cud"),
        ("system/Observation.read", "system/Observation.rs"),
        ("system/Observation.rs", "system/Observation.read"),
        ("system/Observation.r system/Observation.s", "system/Observation.rs"),  # scope equivalence
        ("system/Observation.rs", "system/Observation.s"),
        ("system/Observation.rs", "system/Observation.rs?category=survey"),  # narrower
        ("system/Observation.rs?category=survey", "system/Observation.r?category=survey&code=x"),
        ("system/*.rs openid", "openid"),
        ("system/*.rs", ""),
        ("patient/*.cruds launch/patient", "patient/Observation.rs launch/patient"),
    ],
)
def test_covers(allowed: str, requested: str) -> None:
    assert ScopeSet.parse(allowed).covers(ScopeSet.parse(requested))


@pytest.mark.parametrize(
    ("allowed", "requested"),
    [
        ("system/Observation.rs", "system/Observation.rsu"),
        ("system/Observation.rs", "system/*.rs"),  # one type does not cover every type
        ("system/Observation.cruds", "system/Patient.r"),
        ("patient/*.cruds", "system/Observation.r"),  # contexts do not cover one another
        ("user/*.cruds", "patient/Observation.r"),
        ("system/Observation.read", "system/Observation.write"),
        ("system/Observation.rs?category=survey", "system/Observation.rs"),  # wider than allowed
        ("system/Observation.rs?category=survey", "system/Observation.rs?category=laboratory"),
        ("system/*.rs", "system/Observation.rs offline_access"),
        ("system/*.rs", "system/Observation.rs bogus"),
        ("system/*.cruds", "system/Observation.dus"),
    ],
)
def test_does_not_cover(allowed: str, requested: str) -> None:
    assert not ScopeSet.parse(allowed).covers(ScopeSet.parse(requested))


def test_invalid_allowed_scopes_cover_nothing() -> None:
    allowed = ScopeSet.parse("bogus system/Observation.dus")
    assert not allowed.covers(ScopeSet.parse("system/Observation.r"))
    assert allowed.covers(ScopeSet.parse(""))
