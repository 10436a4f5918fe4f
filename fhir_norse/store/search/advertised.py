"""The search parameters this server advertises, indexes and answers, per resource type.

R4 defines about 700 SearchParameters over the types this server stores; indexing all of them made an
NF response ingest write ~1,150 index rows, most of them for parameters nobody searches
(``Observation.combo-code``, ``combo-value-quantity``, ``component-code`` ... repeat every score of a
scoring Observation three more times). The server therefore indexes, lists in its CapabilityStatement
and answers only:

* the parameters of :data:`ADVERTISED` below: what this project's clients, tests and domain code search
  by (scoring history, alerts, published content lookups by ``url``/``version``, conditional
  operations by ``identifier``), the reference parameters of the Patient compartment and of the
  server's own compartment extension (policy reach is computed from their index rows), and the common
  EHR / SMART / US-Core-style queries on each type;
* :data:`COMMON`: ``_id``, ``_lastUpdated``, ``_tag``, ``_profile``, ``_security``, ``_source``;
* the content pack's own SearchParameters (``profiles/SearchParameter-*.json``, e.g. ``Flag?status=``);
* what a site enables on top with ``FHIR_NORSE_SEARCH_EXTRA_PARAMETERS="Observation.combo-code,..."``
  (any R4 parameter of a stored type), after which ``fhir-norse reindex --type Observation`` fills the
  rows of the resources stored before.

Any other parameter is unknown to the server: 400 under ``Prefer: handling=strict``, ignored (and
reported) otherwise, exactly as a misspelt one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

COMMON: frozenset[str] = frozenset({"_id", "_lastUpdated", "_tag", "_profile", "_security", "_source"})

# Canonical (definitional) resources: found by url, version, name, status ...
_CANONICAL = frozenset(
    {"url", "version", "name", "title", "status", "date", "publisher", "identifier", "description"}
)
_ADDRESS = ("address", "address-city", "address-country", "address-postalcode", "address-state")
_CONTACT = ("telecom", "email", "phone")


def _set(*groups: Iterable[str] | str) -> frozenset[str]:
    out: set[str] = set()
    for group in groups:
        out.update([group] if isinstance(group, str) else group)
    return frozenset(out)


ADVERTISED: Mapping[str, frozenset[str]] = {
    "Patient": _set(
        "active",
        "birthdate",
        "death-date",
        "deceased",
        "family",
        "gender",
        "general-practitioner",
        "given",
        "identifier",
        "link",
        "name",
        "organization",
        _ADDRESS,
        _CONTACT,
    ),
    "Practitioner": _set("active", "family", "gender", "given", "identifier", "name", _ADDRESS, _CONTACT),
    "PractitionerRole": _set(
        "active",
        "date",
        "identifier",
        "location",
        "organization",
        "practitioner",
        "role",
        "service",
        "specialty",
        _CONTACT,
    ),
    "Organization": _set("active", "identifier", "name", "partof", "type", _ADDRESS),
    "CareTeam": _set(
        "category", "date", "encounter", "identifier", "participant", "patient", "status", "subject"
    ),
    "EpisodeOfCare": _set(
        "care-manager",
        "condition",
        "date",
        "identifier",
        "incoming-referral",
        "organization",
        "patient",
        "status",
        "type",
    ),
    # A monitoring plan (fhir_norse/rom/scheduler.py) and what an EHR asks of one; patient and performer
    # put it in the Patient compartment.
    "CarePlan": _set(
        "activity-code",
        "based-on",
        "care-team",
        "category",
        "date",
        "encounter",
        "identifier",
        "instantiates-canonical",
        "intent",
        "part-of",
        "patient",
        "performer",
        "status",
        "subject",
    ),
    "Encounter": _set(
        "based-on",
        "class",
        "date",
        "episode-of-care",
        "identifier",
        "location",
        "part-of",
        "participant",
        "participant-type",
        "patient",
        "practitioner",
        "reason-code",
        "service-provider",
        "status",
        "subject",
        "type",
    ),
    # The visits a "before each appointment" plan counts; actor puts it in the Patient compartment.
    "Appointment": _set(
        "actor",
        "appointment-type",
        "based-on",
        "date",
        "identifier",
        "location",
        "part-status",
        "patient",
        "practitioner",
        "service-type",
        "status",
    ),
    "Questionnaire": _set(_CANONICAL, "code", "context-type", "definition", "effective", "subject-type"),
    "QuestionnaireResponse": _set(
        "author",
        "authored",
        "based-on",
        "encounter",
        "identifier",
        "part-of",
        "patient",
        "questionnaire",
        "source",
        "status",
        "subject",
    ),
    # Not advertised: combo-*, component-* (except the blood-pressure composite), has-member, the
    # genomics parameters, method, specimen, data-absent-reason. Enable them per site if needed.
    "Observation": _set(
        "based-on",
        "category",
        "code",
        "code-value-concept",
        "code-value-date",
        "code-value-quantity",
        "code-value-string",
        "component-code-value-quantity",
        "date",
        "derived-from",
        "device",
        "encounter",
        "focus",
        "identifier",
        "part-of",
        "patient",
        "performer",
        "specimen",
        "status",
        "subject",
        "value-concept",
        "value-date",
        "value-quantity",
        "value-string",
    ),
    "DiagnosticReport": _set(
        "based-on",
        "category",
        "code",
        "conclusion",
        "date",
        "encounter",
        "identifier",
        "issued",
        "patient",
        "performer",
        "result",
        "results-interpreter",
        "status",
        "subject",
    ),
    # What a document archive and an EHR search by (https://hl7.org/fhir/R4/documentreference.html#search);
    # ``related`` finds the document of a DiagnosticReport (context.related).
    "DocumentReference": _set(
        "author",
        "category",
        "contenttype",
        "date",
        "description",
        "encounter",
        "identifier",
        "patient",
        "period",
        "related",
        "relatesto",
        "status",
        "subject",
        "type",
    ),
    "Flag": _set("author", "date", "encounter", "identifier", "patient", "subject"),
    "Task": _set(
        "authored-on",
        "based-on",
        "business-status",
        "code",
        "encounter",
        "focus",
        "group-identifier",
        "identifier",
        "intent",
        "modified",
        "owner",
        "part-of",
        "patient",
        "performer",
        "period",
        "priority",
        "requester",
        "status",
        "subject",
    ),
    "ServiceRequest": _set(
        "authored",
        "based-on",
        "category",
        "code",
        "encounter",
        "identifier",
        "intent",
        "occurrence",
        "patient",
        "performer",
        "priority",
        "requester",
        "status",
        "subject",
    ),
    "CommunicationRequest": _set(
        "authored",
        "based-on",
        "category",
        "encounter",
        "group-identifier",
        "identifier",
        "occurrence",
        "patient",
        "priority",
        "recipient",
        "replaces",
        "requester",
        "sender",
        "status",
        "subject",
    ),
    "Communication": _set(
        "based-on",
        "category",
        "encounter",
        "identifier",
        "part-of",
        "patient",
        "received",
        "recipient",
        "sender",
        "sent",
        "status",
        "subject",
    ),
    "Provenance": _set(
        "agent", "agent-role", "agent-type", "entity", "patient", "recorded", "target", "when"
    ),
    "AuditEvent": _set(
        "action",
        "address",
        "agent",
        "agent-name",
        "agent-role",
        "altid",
        "date",
        "entity",
        "entity-name",
        "entity-role",
        "entity-type",
        "outcome",
        "patient",
        "policy",
        "site",
        "source",
        "subtype",
        "type",
    ),
    "Consent": _set(
        "action",
        "actor",
        "category",
        "consentor",
        "data",
        "date",
        "identifier",
        "organization",
        "patient",
        "period",
        "purpose",
        "scope",
        "security-label",
        "source-reference",
        "status",
    ),
    # Cohorts for Bulk Data's Group-level export (system access only: auth/compartment.py).
    "Group": _set("actual", "characteristic", "code", "identifier", "managing-entity", "member", "type"),
    "Subscription": _set("contact", "criteria", "payload", "status", "type", "url"),
    # The backported SubscriptionTopics (R4 has no SubscriptionTopic: the Backport IG puts them in Basic).
    "Basic": _set("author", "code", "created", "identifier", "patient", "subject"),
    "Binary": frozenset(),
    "CodeSystem": _set(_CANONICAL, "code", "content-mode", "language", "supplements", "system"),
    "ValueSet": _set(_CANONICAL, "code", "expansion", "reference"),
    "ConceptMap": _set(
        _CANONICAL,
        "dependson",
        "other",
        "product",
        "source",
        "source-code",
        "source-system",
        "source-uri",
        "target",
        "target-code",
        "target-system",
        "target-uri",
    ),
    "StructureDefinition": _set(
        _CANONICAL,
        "abstract",
        "base",
        "base-path",
        "derivation",
        "experimental",
        "ext-context",
        "keyword",
        "kind",
        "path",
        "type",
        "valueset",
    ),
    "SearchParameter": _set(
        _CANONICAL - {"identifier", "title"}, "base", "code", "component", "derived-from", "target", "type"
    ),
    "OperationDefinition": _set(
        _CANONICAL - {"identifier"},
        "base",
        "code",
        "input-profile",
        "instance",
        "kind",
        "output-profile",
        "system",
        "type",
    ),
    "Library": _set(
        _CANONICAL,
        "composed-of",
        "content-type",
        "depends-on",
        "derived-from",
        "effective",
        "predecessor",
        "successor",
        "topic",
        "type",
    ),
}


class ExtraParameterError(ValueError):
    """A site-enabled parameter (``FHIR_NORSE_SEARCH_EXTRA_PARAMETERS``) that is not ``Type.code``."""


def parse_extra(raw: str | Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``"Observation.combo-code, Patient.phonetic"`` -> ``(("Observation", "combo-code"), ...)``."""
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    out: list[tuple[str, str]] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        res_type, dot, code = item.partition(".")
        if not dot or not res_type or not code:
            raise ExtraParameterError(f"search parameter {item!r} must have the form Type.code")
        out.append((res_type, code))
    return tuple(out)


def advertised(
    extra: Iterable[tuple[str, str]] = (), base: Mapping[str, frozenset[str]] = ADVERTISED
) -> dict[str, frozenset[str]]:
    """The advertised codes per type: ``base`` plus :data:`COMMON` plus ``extra`` (type, code) pairs."""
    out = {t: codes | COMMON for t, codes in base.items()}
    for res_type, code in extra:
        out[res_type] = out.get(res_type, COMMON) | {code}
    return out
