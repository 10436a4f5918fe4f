"""AuditEvents in the shape of IHE Basic Audit Log Patterns (BALP), and the recorder that hands them on.

Implements the RESTful patterns of https://profiles.ihe.net/ITI/BALP/content.html (3:5.7.3
"RESTful activities") on the R4 AuditEvent (https://hl7.org/fhir/R4/auditevent.html), so a
privacy officer can ask ``AuditEvent?patient=X``, ``?agent=Practitioner/Y``, ``?policy=`` (the
token's ``jti``) and ``?date=``:

* ``type`` ``audit-event-type#rest`` with the ``restful-interaction`` subtype and the BALP action
  (``R`` read/vread, ``E`` search/history/operation, ``C`` create, ``U`` update/patch, ``D`` delete);
* agents as BALP assigns them per pattern (Read: client = DCM 110152 *Destination Role ID*,
  server = 110153 *Source Role ID*; Query/Create/Update: the reverse; Delete: client = 110150
  *Application*, server = ``provenance-participant-type#custodian``). Every client agent also
  carries DCM 110150 *Application*, so one code finds the client in every event. The user is
  the practitioner (or the patient of a patient-context token), typed
  ``v3-ParticipationType#IRCP`` (information recipient) for reads and queries, ``#AUT`` for writes;
* the OAuth access token as BALP's ``IHE.BasicAudit.OAUTHaccessTokenUse.Minimal`` records it: a
  separate agent ``UserAgentTypes#UserOauthAgent``, ``requestor`` true, whose only content is
  ``policy = urn:ietf:params:oauth:jti:<jti>`` (the profile's comment: "jti SHALL be prefixed with
  urn:ietf:params:oauth:jti:"). Neither the token nor any client assertion ever reaches this
  module: no function here takes one, and JWT-shaped text or ``access_token=...`` parameters in
  the free-text inputs are redacted anyway;
* entities: the resource acted on (``audit-entity-type#2`` System Object, ``object-role#4``
  Domain Resource, version-specific where known), the query (``object-role#24``, base64 of the
  request as received), the ``X-Request-Id`` (``BasicAuditEntityType#XrequestId``) and one entity
  per patient concerned (``audit-entity-type#1`` Person, ``object-role#1`` Patient, ``what =
  Patient/x``), which is what the R4 ``AuditEvent-patient`` search parameter indexes;
* the token grant as BALP's ``IHE.IUA.71`` (ITI-71 Get Access Token): type DCM 110114 *User
  Authentication*, subtype ``urn:ihe:event-type-code#ITI-71``, agents client and
  ``UserAgentTypes#AuthzOauthService``, one entity holding the token request without its secrets.

``meta.profile`` names a BALP profile only when the event conforms to it. The REST profiles fix
``outcome = 0`` ("failures are recorded differently"), require the client and server network
addresses, and Patient* variants allow exactly one patient entity (BALP PatientQuery asks for one
event per patient; this module records one event with one entity per patient instead and then
claims no REST profile). History, operations, transaction and batch have no BALP profile.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlencode

from fhir_norse.auth.caller import Caller

__all__ = [
    "AUTHENTICATION",
    "AUTHORIZATION",
    "AUTHORIZATION_STEPS",
    "CLIENT_SYSTEM",
    "FAILED",
    "INTERACTIONS",
    "OUTCOMES",
    "REFUSED",
    "REST",
    "SUCCESS",
    "THROTTLED",
    "TOKEN_GRANT",
    "AuditInputs",
    "AuditRecorder",
    "AuditSink",
    "BuiltEvent",
    "build_audit_event",
    "build_authentication_refusal",
    "build_token_grant_event",
    "counting_repeats",
    "render_audit_event",
]

AuditSink = Callable[[dict[str, Any]], None]

# Outcomes as the caller names them -> http://hl7.org/fhir/ValueSet/audit-event-outcome (R4 code).
SUCCESS: Final = "success"
REFUSED: Final = "refused"  # 401/403/404 of the authorization seam: "minor failure"
FAILED: Final = "failed"  # the server could not do it: "serious failure"
_OUTCOME_CODES: Final = {SUCCESS: "0", REFUSED: "4", FAILED: "8"}
OUTCOMES: Final = frozenset(_OUTCOME_CODES)

# The kinds of event (AuditInputs.kind): a FHIR interaction, a token request, a refused authentication.
REST: Final = "rest"
TOKEN_GRANT: Final = "token-grant"
# Kinds of refusal before any caller is known (besides refused token grants): no or a bad token
# (401), and too many of those (429). See build_authentication_refusal.
AUTHENTICATION: Final = "authentication"
THROTTLED: Final = "throttled"
# A step of SMART App Launch (issue 16): sign-in, consent, the code and refresh grants, revocation,
# introspection, EHR launch. See build_authorization_event.
AUTHORIZATION: Final = "authorization"
AUTHORIZATION_STEPS: Final = frozenset(
    {"authorize", "login", "consent", "authorization_code", "refresh_token", "revoke", "introspect", "launch"}
)
# Extra subtype coding naming the step of an authorization event.
STEP_SYSTEM: Final = "urn:fhir-norse:authorization-step"
CLIENT_SYSTEM: Final = "urn:fhir-norse:client"
# Extra subtype coding naming the operation of an ``operation:<name>`` interaction.
OPERATION_SYSTEM: Final = "urn:fhir-norse:operation"

_BALP: Final = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/"
PROFILE_OAUTH_MINIMAL: Final = _BALP + "IHE.BasicAudit.OAUTHaccessTokenUse.Minimal"
PROFILE_TOKEN_GRANT: Final = _BALP + "IHE.IUA.71"
JTI_PREFIX: Final = "urn:ietf:params:oauth:jti:"

_DCM: Final = "http://dicom.nema.org/resources/ontology/DCM"
_PARTICIPATION: Final = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
_ENTITY_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE: Final = "http://terminology.hl7.org/CodeSystem/object-role"
_USER_AGENT_TYPES: Final = "https://profiles.ihe.net/ITI/BALP/CodeSystem/UserAgentTypes"
_BALP_ENTITY_TYPE: Final = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"

Coding = dict[str, str]


def _coding(system: str, code: str, display: str) -> Coding:
    return {"system": system, "code": code, "display": display}


_REST_TYPE: Final = _coding(
    "http://terminology.hl7.org/CodeSystem/audit-event-type", "rest", "Restful Operation"
)
_USER_AUTHENTICATION: Final = _coding(_DCM, "110114", "User Authentication")
_ITI_71: Final = _coding("urn:ihe:event-type-code", "ITI-71", "Get Access Token")
_LOGIN: Final = _coding(_DCM, "110122", "Login")
_APPLICATION: Final = _coding(_DCM, "110150", "Application")
_DESTINATION: Final = _coding(_DCM, "110152", "Destination Role ID")
_SOURCE: Final = _coding(_DCM, "110153", "Source Role ID")
_CUSTODIAN: Final = _coding(
    "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "custodian", "Custodian"
)
_AUTH_SERVER: Final = _coding(_USER_AGENT_TYPES, "AuthzOauthService", "OAuth Authorization Server")
_OAUTH_USER: Final = _coding(_USER_AGENT_TYPES, "UserOauthAgent", "User OAuth Agent participant")
_RECIPIENT: Final = _coding(_PARTICIPATION, "IRCP", "information recipient")
_AUTHOR: Final = _coding(_PARTICIPATION, "AUT", "author (originator)")
_APPLICATION_SERVER: Final = _coding(
    "http://terminology.hl7.org/CodeSystem/security-source-type", "4", "Application Server"
)
_SYSTEM_OBJECT: Final = _coding(_ENTITY_TYPE, "2", "System Object")
_PERSON: Final = _coding(_ENTITY_TYPE, "1", "Person")
_DOMAIN_RESOURCE: Final = _coding(_OBJECT_ROLE, "4", "Domain Resource")
_QUERY_ROLE: Final = _coding(_OBJECT_ROLE, "24", "Query")
_PATIENT_ROLE: Final = _coding(_OBJECT_ROLE, "1", "Patient")
_REQUEST_ID: Final = _coding(
    _BALP_ENTITY_TYPE, "XrequestId", "transport specific unique identifier where http X-Request-Id is used"
)

# Which side of the exchange BALP calls source and destination (content.html, 3:5.7.3).
_SERVER_SENDS, _CLIENT_SENDS, _DELETE = "server-sends", "client-sends", "delete"
_CLIENT_TYPES: Final = {
    _SERVER_SENDS: [_DESTINATION, _APPLICATION],
    _CLIENT_SENDS: [_SOURCE, _APPLICATION],
    _DELETE: [_APPLICATION],
}
_SERVER_TYPES: Final = {_SERVER_SENDS: [_SOURCE], _CLIENT_SENDS: [_DESTINATION], _DELETE: [_CUSTODIAN]}


@dataclass(frozen=True, slots=True)
class _Rest:
    """How one FHIR interaction maps onto BALP."""

    subtype: str  # http://hl7.org/fhir/restful-interaction
    action: str  # http://hl7.org/fhir/ValueSet/audit-event-action
    flow: str
    user_type: Coding
    profile: str | None  # BALP base profile ("Read" -> IHE.BasicAudit.Read / PatientRead)


_REST: Final = {
    "read": _Rest("read", "R", _SERVER_SENDS, _RECIPIENT, "Read"),
    "vread": _Rest("vread", "R", _SERVER_SENDS, _RECIPIENT, "Read"),
    "search-type": _Rest("search-type", "E", _CLIENT_SENDS, _RECIPIENT, "Query"),
    "search-system": _Rest("search-system", "E", _CLIENT_SENDS, _RECIPIENT, "Query"),
    "history-instance": _Rest("history-instance", "E", _CLIENT_SENDS, _RECIPIENT, None),
    "history-type": _Rest("history-type", "E", _CLIENT_SENDS, _RECIPIENT, None),
    "history-system": _Rest("history-system", "E", _CLIENT_SENDS, _RECIPIENT, None),
    "create": _Rest("create", "C", _CLIENT_SENDS, _AUTHOR, "Create"),
    "update": _Rest("update", "U", _CLIENT_SENDS, _AUTHOR, "Update"),
    "patch": _Rest("patch", "U", _CLIENT_SENDS, _AUTHOR, "Update"),
    "delete": _Rest("delete", "D", _DELETE, _AUTHOR, "Delete"),
    "operation": _Rest("operation", "E", _CLIENT_SENDS, _RECIPIENT, None),
    "transaction": _Rest("transaction", "E", _CLIENT_SENDS, _AUTHOR, None),
    "batch": _Rest("batch", "E", _CLIENT_SENDS, _RECIPIENT, None),
}
# Accepted ``interaction`` values; operations are ``operation:<name>`` (``operation:validate``).
INTERACTIONS: Final = frozenset(_REST.keys() - {"operation"} | {TOKEN_GRANT})

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # https://hl7.org/fhir/R4/datatypes.html#id
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}")
_OPERATION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}")
_USER_REFERENCE = re.compile(
    r"(?:Practitioner|PractitionerRole|Patient|RelatedPerson|Person)/[A-Za-z0-9\-.]{1,64}"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# Defence in depth: nothing that looks like a JWT or a credential parameter is ever recorded.
_JWT = re.compile(r"eyJ[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*")
_CREDENTIAL_PARAM = re.compile(
    r"(?i)(\b(?:access_token|refresh_token|id_token|client_assertion|client_secret|assertion|code_verifier)=)"
    r"[^&\s]*"
)
_REDACTED = "redacted"
_TEXT_LIMIT = 1024
_QUERY_LIMIT = 8192


def _redact(text: str) -> str:
    return _CREDENTIAL_PARAM.sub(r"\1" + _REDACTED, _JWT.sub(_REDACTED, text))


def _text(value: str, limit: int = _TEXT_LIMIT) -> str:
    """A single-line, bounded, redacted string that R4 validation accepts (no control characters)."""
    return _redact(_CONTROL.sub(" ", value)).strip()[:limit]


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def _fresh(event: dict[str, Any]) -> dict[str, Any]:
    """A copy of the event, so no event shares the module's coding constants with another."""
    return {key: _copy(item) for key, item in event.items()}


def _instant(recorded: datetime) -> str:
    """An R4 ``instant`` (https://hl7.org/fhir/R4/datatypes.html#instant) in UTC, to the millisecond."""
    if recorded.tzinfo is None or recorded.utcoffset() is None:
        raise ValueError("recorded must be timezone-aware")
    utc = recorded.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _network(address: str | None) -> dict[str, str] | None:
    """``agent.network`` with its http://hl7.org/fhir/ValueSet/network-type code (2 IP, 5 URI, 1 name)."""
    if not address:
        return None
    address = _text(address, 256)
    if not address:
        return None
    try:
        ipaddress.ip_address(address)
        kind = "2"
    except ValueError:
        kind = "5" if "://" in address else "1"
    return {"address": address, "type": kind}


def _checked_id(value: str, what: str) -> str:
    if not _ID.fullmatch(value):
        raise ValueError(f"{what} is not a FHIR id: {value!r}")
    return value


def _patient_ids(patients: Iterable[str], resource_type: str | None, resource_id: str | None) -> list[str]:
    """Patient ids in order, without duplicates; ``Patient/x`` is accepted for ``x``.

    A Patient resource is itself the patient concerned, so ``Patient/x`` as the resource acted on
    adds ``x`` even when the caller did not list it.
    """
    if isinstance(patients, str):
        raise TypeError("patients is a collection of ids, not one string")
    ids: dict[str, None] = {}
    if resource_type == "Patient" and resource_id is not None:
        ids[resource_id] = None
    for patient in patients:
        if not isinstance(patient, str):
            raise TypeError(f"patient ids are strings, not {type(patient).__name__}")
        ids[_checked_id(patient.removeprefix("Patient/"), "patient")] = None
    return list(ids)


def _user_who(caller: Caller) -> dict[str, Any] | None:
    """The human (or patient) on whose behalf the client acts, as ``agent.who``.

    Order: the practitioner of a ``user/`` token; a ``fhirUser`` that is a relative reference to a
    person; the patient of a patient-context token; any other ``fhirUser``/``sub`` as an identifier.
    Token claims are not ours to reject here: one that is not a FHIR id is kept as an identifier,
    so the event is still recorded.
    """
    if caller.practitioner:
        return _person_who("Practitioner", caller.practitioner)
    if caller.user and _USER_REFERENCE.fullmatch(caller.user):
        return {"reference": caller.user}
    if caller.patient:
        return _person_who("Patient", caller.patient)
    if caller.user and (user := _text(caller.user, 256)):
        return {"identifier": {"value": user}}
    return None


def _person_who(resource_type: str, person_id: str) -> dict[str, Any]:
    if _ID.fullmatch(person_id):
        return {"reference": f"{resource_type}/{person_id}"}
    return {"identifier": {"value": _text(person_id, 256) or "?"}}


def _client_who(client_id: str | None) -> dict[str, Any] | None:
    value = _text(client_id, 256) if client_id else ""
    return {"identifier": {"system": CLIENT_SYSTEM, "value": value}} if value else None


def _agent(
    types: list[Coding],
    *,
    requestor: bool,
    who: dict[str, Any] | None = None,
    network: dict[str, str] | None = None,
    policy: str | None = None,
) -> dict[str, Any]:
    agent: dict[str, Any] = {"type": {"coding": list(types)}}
    if who is not None:
        agent["who"] = who
    agent["requestor"] = requestor
    if policy is not None:
        agent["policy"] = [policy]
    if network is not None:
        agent["network"] = network
    return agent


def _oauth_agent(token_id: str | None) -> dict[str, Any] | None:
    """BALP OAUTHaccessTokenUse.Minimal ``agent:oUser``: the token's ``jti`` and nothing else."""
    jti = _text(token_id, 256).replace(" ", "") if token_id else ""
    return _agent([_OAUTH_USER], requestor=True, policy=JTI_PREFIX + jti) if jti else None


def _source(server_name: str, site: str | None) -> dict[str, Any]:
    source: dict[str, Any] = {}
    if site:
        source["site"] = _text(site, 256)
    source["observer"] = {"display": _text(server_name, 256) or "fhir-norse"}
    source["type"] = [_APPLICATION_SERVER]
    return source


def _query_entity(query: str) -> dict[str, Any]:
    raw = _redact(query)[:_QUERY_LIMIT]
    return {
        "type": _SYSTEM_OBJECT,
        "role": _QUERY_ROLE,
        "query": base64.b64encode(raw.encode("utf-8")).decode("ascii"),
    }


def _request_entity(request_id: str) -> dict[str, Any]:
    return {"what": {"identifier": {"value": _text(request_id, 256)}}, "type": _REQUEST_ID}


def _outcome(event: dict[str, Any], outcome: str, failure_reason: str | None) -> None:
    try:
        event["outcome"] = _OUTCOME_CODES[outcome]
    except KeyError:
        raise ValueError(f"unknown outcome {outcome!r}; expected one of {sorted(OUTCOMES)}") from None
    if failure_reason is not None and outcome == SUCCESS:
        raise ValueError("a successful event has no failure reason")
    if failure_reason and (description := _text(failure_reason)):
        event["outcomeDesc"] = description


def _checked(outcome: str, failure_reason: str | None, recorded: datetime) -> None:
    """Refuse (ValueError) an unknown outcome, a failure reason on a success, a naive ``recorded``."""
    _outcome({}, outcome, failure_reason)
    _instant(recorded)


def _reason(failure_reason: str | None) -> str | None:
    """The failure reason as recorded (single line, bounded, redacted), None when empty."""
    return _text(failure_reason) or None if failure_reason else None


def _scopes(scopes: str | None) -> str | None:
    """The scopes asked for as recorded, None when empty."""
    return _text(scopes, _QUERY_LIMIT) or None if scopes else None


def _head(inputs: AuditInputs, event_type: Coding, subtype: list[Coding], action: str) -> dict[str, Any]:
    """An event's ``type``, ``subtype``, ``action``, ``recorded``, ``outcome`` and ``outcomeDesc``."""
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": event_type,
        "subtype": subtype,
        "action": action,
        "recorded": _instant(inputs.recorded),
    }
    _outcome(event, inputs.outcome, inputs.failure_reason)
    return event


def _user_of(inputs: AuditInputs) -> dict[str, Any] | None:
    """The user agent's ``who`` (a reference, else an identifier), None without a user."""
    if inputs.user_reference is not None:
        return {"reference": inputs.user_reference}
    if inputs.user_identifier is not None:
        return {"identifier": {"value": inputs.user_identifier}}
    return None


def _server_agent(types: list[Coding], inputs: AuditInputs) -> dict[str, Any]:
    """This server's agent: its name and base URL."""
    return _agent(
        types,
        requestor=False,
        who={"display": _text(inputs.server_name, 256) or "fhir-norse"},
        network=_network(inputs.server_address),
    )


def _app_agent(inputs: AuditInputs, *, requestor: bool) -> dict[str, Any]:
    """The app's agent of a token or authorization event: its client id, address, the issued token's jti."""
    jti = inputs.token_id or ""
    return _agent(
        [_APPLICATION],
        requestor=requestor,
        who=_client_who(inputs.client_id),
        network=_network(inputs.source_address),
        policy=JTI_PREFIX + jti if jti else None,
    )


def _token_request(name: str, value: str, scopes: str | None) -> dict[str, Any]:
    """The token request's query entity: ``name=value`` (grant type or step) and the ``scope``."""
    request = [(name, value)]
    if scopes:
        request.append(("scope", scopes))
    return _query_entity(urlencode(request))


def _refused_target(
    resource_type: str | None, resource_id: str | None, version: str | None
) -> tuple[str | None, str | None, str | None]:
    """What a refused request asked for, as far as it names a resource: a refusal is often *about* a
    malformed address (``/fhir/patient/1``), which must be recorded, not make the record fail. A part
    that is not a resource type, id or version is left out with what follows it (the failure reason
    says what was wrong)."""
    if resource_type is None or not _RESOURCE_TYPE.fullmatch(resource_type):
        return None, None, None
    if resource_id is None or not _ID.fullmatch(resource_id):
        return resource_type, None, None
    if version is not None and not _ID.fullmatch(version):
        return resource_type, resource_id, None
    return resource_type, resource_id, version


def _rest_pattern(interaction: str) -> tuple[_Rest, str | None]:
    name, _, operation = interaction.partition(":")
    if name == "operation":
        if not _OPERATION_NAME.fullmatch(operation.removeprefix("$")):
            raise ValueError(f"operation interactions are 'operation:<name>', got {interaction!r}")
        return _REST["operation"], operation.removeprefix("$")
    if operation or name not in _REST:
        raise ValueError(f"unknown interaction {interaction!r}")
    return _REST[name], None


def build_audit_event(
    *,
    interaction: str,
    outcome: str,
    caller: Caller,
    resource_type: str | None,
    resource_id: str | None = None,
    version: str | None = None,
    query: str | None = None,
    patients: Iterable[str] = (),
    source_address: str | None = None,
    request_id: str | None = None,
    server_name: str = "fhir-norse",
    recorded: datetime,
    failure_reason: str | None = None,
    server_address: str | None = None,
    site: str | None = None,
) -> dict[str, Any]:
    """The R4 AuditEvent (JSON) for one FHIR interaction, following IHE BALP RESTful activities.

    ``interaction`` is one of :data:`INTERACTIONS` or ``operation:<name>``; ``outcome`` one of
    ``success`` (``0``), ``refused`` (``4``, authorization answered 401/403/404) or ``failed``
    (``8``, server error), with ``failure_reason`` as ``outcomeDesc``: a short reason, never a token
    and never resource content. A refused or failed request's resource type, id and version are the
    client's words: those that are malformed are left out (see :func:`_refused_target`), where a
    success's would be a ``ValueError``. ``query`` is the request relative to the base as received
    (``Observation?patient=123``, or the form body of ``POST _search``), recorded base64 as BALP
    Query asks; ``patients`` the ids of every patient whose data the interaction touched.
    ``source_address`` is the client's network address, ``server_address`` the server's base URL.
    ``token-grant`` builds :func:`build_token_grant_event` from ``caller`` (its ``scopes`` are the
    scopes asked for, its ``token_id`` the issued token's ``jti``) and takes no resource, query,
    request id or patient. See https://profiles.ihe.net/ITI/BALP/content.html.
    """
    if interaction == TOKEN_GRANT:
        if resource_type or resource_id or version or query or request_id or list(patients):
            raise ValueError("a token grant concerns no resource, query, request id or patient")
        return build_token_grant_event(
            outcome=outcome,
            client_id=caller.client_id,
            scopes=" ".join(sorted(caller.scopes)) or None,
            source_address=source_address,
            token_id=caller.token_id,
            server_name=server_name,
            server_address=server_address,
            site=site,
            recorded=recorded,
            failure_reason=failure_reason,
        )
    _rest_pattern(interaction)
    if outcome != SUCCESS:
        resource_type, resource_id, version = _refused_target(resource_type, resource_id, version)
    if resource_type is not None and not _RESOURCE_TYPE.fullmatch(resource_type):
        raise ValueError(f"not a resource type: {resource_type!r}")
    if resource_id is not None:
        _checked_id(resource_id, "resource id")
        if resource_type is None:
            raise ValueError("a resource id needs its resource type")
    if version is not None:
        _checked_id(version, "version")
        if resource_id is None:
            raise ValueError("a version needs its resource id")
    patient_ids = _patient_ids(patients, resource_type, resource_id)
    _checked(outcome, failure_reason, recorded)
    user_who = _user_who(caller)
    inputs = AuditInputs(
        kind=REST,
        outcome=outcome,
        recorded=recorded,
        interaction=interaction,
        client_id=_normal(caller.client_id),
        user_reference=user_who["reference"] if user_who and "reference" in user_who else None,
        user_identifier=user_who["identifier"]["value"] if user_who and "identifier" in user_who else None,
        token_id=_jti(caller.token_id),
        source_address=_normal(source_address),
        resource_type=resource_type,
        resource_id=resource_id,
        version=version,
        query=_redact(query)[:_QUERY_LIMIT] if query else None,
        request_id=_normal(request_id),
        patients=tuple(patient_ids),
        failure_reason=_reason(failure_reason),
        server_name=server_name,
        server_address=server_address,
        site=site,
    )
    return BuiltEvent(_render_rest(inputs), inputs)


def _render_rest(inputs: AuditInputs) -> dict[str, Any]:
    pattern, operation = _rest_pattern(inputs.interaction or "")
    resource_type, resource_id, version = inputs.resource_type, inputs.resource_id, inputs.version
    patient_ids = inputs.patients
    outcome, query, request_id = inputs.outcome, inputs.query, inputs.request_id

    subtype = [_coding("http://hl7.org/fhir/restful-interaction", pattern.subtype, pattern.subtype)]
    if operation is not None:
        subtype.append(_coding(OPERATION_SYSTEM, operation, f"${operation}"))
    event = _head(inputs, _REST_TYPE, subtype, pattern.action)
    user_who = _user_of(inputs)
    client_network = _network(inputs.source_address)
    server_network = _network(inputs.server_address)
    agents = [
        _agent(
            _CLIENT_TYPES[pattern.flow],
            requestor=user_who is None,
            who=_client_who(inputs.client_id),
            network=client_network,
        )
    ]
    if user_who is not None:
        agents.append(_agent([pattern.user_type], requestor=True, who=user_who))
    agents.append(_server_agent(_SERVER_TYPES[pattern.flow], inputs))
    oauth = _oauth_agent(inputs.token_id)
    if oauth is not None:
        agents.append(oauth)
    event["agent"] = agents
    event["source"] = _source(inputs.server_name, inputs.site)

    entities: list[dict[str, Any]] = []
    if resource_id is not None:
        reference = f"{resource_type}/{resource_id}" + (f"/_history/{version}" if version else "")
        entities.append({"what": {"reference": reference}, "type": _SYSTEM_OBJECT, "role": _DOMAIN_RESOURCE})
    if query:
        entities.append(_query_entity(query))
    if request_id and _text(request_id, 256):
        entities.append(_request_entity(request_id))
    entities.extend(
        {"what": {"reference": f"Patient/{patient}"}, "type": _PERSON, "role": _PATIENT_ROLE}
        for patient in patient_ids
    )
    if entities:
        event["entity"] = entities

    profiles = []
    if (
        outcome == SUCCESS
        and pattern.profile is not None
        and client_network is not None
        and server_network is not None
        and len(patient_ids) <= 1
        # Read/Create/Update/Delete have exactly one System Object entity (the data), Query one query.
        and (resource_id is not None) != (pattern.profile == "Query")
        and bool(query) == (pattern.profile == "Query")
        and "who" in agents[0]
    ):
        profiles.append(_BALP + "IHE.BasicAudit." + ("Patient" if patient_ids else "") + pattern.profile)
    if oauth is not None:
        profiles.append(PROFILE_OAUTH_MINIMAL)
    if profiles:
        event = {"resourceType": "AuditEvent", "meta": {"profile": profiles}, **event}
    return _fresh(event)


def build_token_grant_event(
    *,
    outcome: str,
    client_id: str | None,
    scopes: str | None,
    source_address: str | None,
    recorded: datetime,
    failure_reason: str | None = None,
    token_id: str | None = None,
    grant_type: str = "client_credentials",
    server_name: str = "fhir-norse",
    server_address: str | None = None,
    site: str | None = None,
) -> dict[str, Any]:
    """The AuditEvent of one token request, after BALP ``IHE.IUA.71`` (ITI-71 Get Access Token).

    https://profiles.ihe.net/ITI/BALP/StructureDefinition-IHE.IUA.71.html: type DCM 110114 *User
    Authentication*, subtype ``urn:ihe:event-type-code#ITI-71``, action ``E``; agents the client
    (DCM 110150, as far as it identified itself: ``client_id`` may be ``None`` for a request that
    named no client) and this server as ``UserAgentTypes#AuthzOauthService``; one entity, the token
    request (``object-role#24``). BALP records the raw request "without the code_verifier value";
    here it is reduced further to ``grant_type`` and ``scope``, because a ``client_credentials``
    request carries the signed client assertion, which must not be kept. ``token_id`` is the
    ``jti`` of the token issued, recorded as the client agent's ``policy`` so later uses of the
    token (``AuditEvent?policy=``) lead back to the grant.
    """
    _checked(outcome, failure_reason, recorded)
    inputs = AuditInputs(
        kind=TOKEN_GRANT,
        outcome=outcome,
        recorded=recorded,
        interaction=_text(grant_type, 64),
        client_id=_normal(client_id),
        token_id=_jti(token_id),
        source_address=_normal(source_address),
        failure_reason=_reason(failure_reason),
        scopes=_scopes(scopes),
        server_name=server_name,
        server_address=server_address,
        site=site,
    )
    return BuiltEvent(_render_grant(inputs), inputs)


def _render_grant(inputs: AuditInputs) -> dict[str, Any]:
    event = _head(inputs, _USER_AUTHENTICATION, [_ITI_71], "E")
    client, server = _app_agent(inputs, requestor=True), _server_agent([_AUTH_SERVER], inputs)
    event["agent"] = [client, server]
    event["source"] = _source(inputs.server_name, inputs.site)
    event["entity"] = [_token_request("grant_type", inputs.interaction or "", inputs.scopes)]
    # The BALP profile asks for both parties' identity and address.
    if inputs.outcome == SUCCESS and "who" in client and "network" in client and "network" in server:
        event = {"resourceType": "AuditEvent", "meta": {"profile": [PROFILE_TOKEN_GRANT]}, **event}
    return _fresh(event)


def build_authorization_event(
    *,
    step: str,
    outcome: str,
    client_id: str | None,
    person: str | None,
    patient: str | None,
    scopes: str | None,
    source_address: str | None,
    recorded: datetime,
    failure_reason: str | None = None,
    token_id: str | None = None,
    server_name: str = "fhir-norse",
    server_address: str | None = None,
    site: str | None = None,
) -> dict[str, Any]:
    """The AuditEvent of one step of SMART App Launch, in the shape of the token grant's (BALP
    ``IHE.IUA.71``): type DCM 110114 *User Authentication*, subtypes ITI-71 and the step
    (``urn:fhir-norse:authorization-step#<step>``), action ``E``; agents the app (DCM 110150, its
    ``client_id``, the issued token's jti as ``policy``), the person (``who`` ``Patient/x`` or
    ``Practitioner/y``, ``requestor``) and this server (``AuthzOauthService``); entities the request
    (``grant_type``/step and ``scope``, no secret) and the patient concerned (``object-role#1``), which
    ``AuditEvent?patient=`` finds. ``person`` that is no such reference is kept as an identifier."""
    if step not in AUTHORIZATION_STEPS:
        raise ValueError(
            f"unknown authorization step {step!r}; expected one of {sorted(AUTHORIZATION_STEPS)}"
        )
    _checked(outcome, failure_reason, recorded)
    person_text = _normal(person)
    reference = person_text if person_text and _USER_REFERENCE.fullmatch(person_text) else None
    patients: tuple[str, ...] = ()
    if patient:
        bare = patient.removeprefix("Patient/")
        patients = (bare,) if _ID.fullmatch(bare) else ()
    inputs = AuditInputs(
        kind=AUTHORIZATION,
        outcome=outcome,
        recorded=recorded,
        interaction=step,
        client_id=_normal(client_id),
        user_reference=reference,
        user_identifier=person_text if reference is None else None,
        token_id=_jti(token_id),
        source_address=_normal(source_address),
        patients=patients,
        failure_reason=_reason(failure_reason),
        scopes=_scopes(scopes),
        server_name=server_name,
        server_address=server_address,
        site=site,
    )
    return BuiltEvent(_render_authorization(inputs), inputs)


def _render_authorization(inputs: AuditInputs) -> dict[str, Any]:
    step = inputs.interaction or ""
    event = _head(inputs, _USER_AUTHENTICATION, [_ITI_71, _coding(STEP_SYSTEM, step, step)], "E")
    user_who = _user_of(inputs)
    agents = [_app_agent(inputs, requestor=user_who is None)]
    if user_who is not None:
        agents.append(_agent([_RECIPIENT], requestor=True, who=user_who))
    agents.append(_server_agent([_AUTH_SERVER], inputs))
    event["agent"] = agents
    event["source"] = _source(inputs.server_name, inputs.site)
    name = "grant_type" if step in ("authorization_code", "refresh_token") else "step"
    entities = [_token_request(name, step, inputs.scopes)]
    entities.extend(
        {"what": {"reference": f"Patient/{patient}"}, "type": _PERSON, "role": _PATIENT_ROLE}
        for patient in inputs.patients
    )
    event["entity"] = entities
    return _fresh(event)


def build_authentication_refusal(
    *,
    failure_reason: str,
    source_address: str | None,
    recorded: datetime,
    request_id: str | None = None,
    server_name: str = "fhir-norse",
    server_address: str | None = None,
    site: str | None = None,
) -> dict[str, Any]:
    """The AuditEvent of a FHIR request refused before any caller was known: no access token, one
    that does not verify (401), or too many such attempts from one address or with one token (429).

    BALP has no pattern for it; it takes the shape of the token grant's: type DCM 110114 *User
    Authentication*, subtype DCM 110122 *Login*, action ``E``, outcome ``4`` with ``failure_reason``;
    agents the client as far as the network knows it (DCM 110150 *Application*, its address, no
    identity: nothing was verified) and this server; the ``X-Request-Id`` as entity. Never the token.
    """
    _checked(REFUSED, failure_reason, recorded)
    inputs = AuditInputs(
        kind=AUTHENTICATION,
        outcome=REFUSED,
        recorded=recorded,
        source_address=_normal(source_address),
        request_id=_normal(request_id),
        failure_reason=_text(failure_reason) or None,
        server_name=server_name,
        server_address=server_address,
        site=site,
    )
    return BuiltEvent(_render_refusal(inputs), inputs)


def _render_refusal(inputs: AuditInputs) -> dict[str, Any]:
    event = _head(inputs, _USER_AUTHENTICATION, [_LOGIN], "E")
    event["agent"] = [
        _agent([_APPLICATION], requestor=True, network=_network(inputs.source_address)),
        _server_agent([_DESTINATION], inputs),
    ]
    event["source"] = _source(inputs.server_name, inputs.site)
    if inputs.request_id:
        event["entity"] = [_request_entity(inputs.request_id)]
    return _fresh(event)


def counting_repeats(event: dict[str, Any], *, count: int, first: datetime, last: datetime) -> dict[str, Any]:
    """``event`` made to stand for ``count`` refusals of one kind from one source that were not recorded
    one by one: ``period`` from the first to the last of them, and an entity whose ``detail`` ``count``
    holds the number (https://hl7.org/fhir/R4/auditevent-definitions.html#AuditEvent.entity.detail)."""
    summary = _with_repeats(event, count, first, last)
    if isinstance(event, BuiltEvent):
        return BuiltEvent(summary, replace(event.inputs, repeats=(count, first, last)))
    return summary


def _with_repeats(event: dict[str, Any], count: int, first: datetime, last: datetime) -> dict[str, Any]:
    summary = _fresh(event)
    summary["period"] = {"start": _instant(first), "end": _instant(last)}
    summary["entity"] = [
        *summary.get("entity", []),
        {
            "description": "refused requests of this kind and source not recorded one by one",
            "detail": [{"type": "count", "valueString": str(count)}],
        },
    ]
    return summary


@dataclass(frozen=True, slots=True)
class AuditInputs:
    """What one AuditEvent is made of, as the audit log stores it (no FHIR body): the builders'
    arguments after checking, normalising and redacting them, so that :func:`render_audit_event`
    gives back exactly the event the builder returned."""

    kind: str  # REST, TOKEN_GRANT, AUTHENTICATION or AUTHORIZATION
    outcome: str  # SUCCESS, REFUSED or FAILED
    recorded: datetime  # timezone-aware
    # REST: the interaction (``read``, ``operation:validate``); TOKEN_GRANT: the grant type;
    # AUTHORIZATION: the step (``consent``, ``authorization_code``...).
    interaction: str | None = None
    client_id: str | None = None
    # The user agent's ``who``: a reference (``Practitioner/x``, ``Patient/y``) or an identifier value.
    user_reference: str | None = None
    user_identifier: str | None = None
    token_id: str | None = None  # the access token's (REST) or the issued token's (grant) jti
    source_address: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    version: str | None = None
    query: str | None = None  # redacted and bounded, as recorded
    request_id: str | None = None
    patients: tuple[str, ...] = ()  # the patient entities, in order
    failure_reason: str | None = None
    scopes: str | None = None  # TOKEN_GRANT: the scopes asked for
    server_name: str = "fhir-norse"
    server_address: str | None = None
    site: str | None = None
    # A summary of refusals not recorded one by one: (count, first, last); see counting_repeats.
    repeats: tuple[int, datetime, datetime] | None = None


class BuiltEvent(dict[str, Any]):
    """An AuditEvent as the builders return it: the R4 JSON, carrying the :class:`AuditInputs` it was
    rendered from (what the audit log stores)."""

    __slots__ = ("inputs",)

    def __init__(self, event: dict[str, Any], inputs: AuditInputs) -> None:
        super().__init__(event)
        self.inputs = inputs


def render_audit_event(inputs: AuditInputs) -> dict[str, Any]:
    """The AuditEvent (JSON, without ``id`` and ``meta`` of storage) that ``inputs`` stand for."""
    if inputs.kind == REST:
        event = _render_rest(inputs)
    elif inputs.kind == TOKEN_GRANT:
        event = _render_grant(inputs)
    elif inputs.kind == AUTHENTICATION:
        event = _render_refusal(inputs)
    elif inputs.kind == AUTHORIZATION:
        event = _render_authorization(inputs)
    else:
        raise ValueError(f"unknown kind of audit event {inputs.kind!r}")
    if inputs.repeats is not None:
        count, first, last = inputs.repeats
        event = _with_repeats(event, count, first, last)
    return event


def _normal(value: str | None) -> str | None:
    """A free-text input as the event records it (single line, bounded, redacted), None when empty."""
    return (_text(value, 256) or None) if value else None


def _jti(token_id: str | None) -> str | None:
    return (_text(token_id, 256).replace(" ", "") or None) if token_id else None


def _now() -> datetime:
    return datetime.now(UTC)


class AuditRecorder:
    """Builds AuditEvents with this server's defaults and hands the ones it records to a sink.

    The server stores REST events itself (same transaction as a write), so :meth:`event` only
    builds. :meth:`emit` and :meth:`record_token_grant` pass events to ``sink``, a function that
    stores one AuditEvent durably and raises if it cannot (then the caller must fail the request:
    no access without a record). The recorder keeps no mutable state, so it is safe to share
    between threads as long as ``sink`` is.
    """

    def __init__(
        self,
        sink: AuditSink | None = None,
        *,
        server_name: str = "fhir-norse",
        server_address: str | None = None,
        site: str | None = None,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self._sink = sink
        self.server_name = server_name
        self.server_address = server_address
        self.site = site
        self._clock = clock

    def event(
        self,
        *,
        interaction: str,
        outcome: str,
        caller: Caller,
        resource_type: str | None,
        resource_id: str | None = None,
        version: str | None = None,
        query: str | None = None,
        patients: Iterable[str] = (),
        source_address: str | None = None,
        request_id: str | None = None,
        failure_reason: str | None = None,
    ) -> dict[str, Any]:
        """:func:`build_audit_event` with this server's name, address, site and clock."""
        return build_audit_event(
            interaction=interaction,
            outcome=outcome,
            caller=caller,
            resource_type=resource_type,
            resource_id=resource_id,
            version=version,
            query=query,
            patients=patients,
            source_address=source_address,
            request_id=request_id,
            failure_reason=failure_reason,
            **self._stamp(),
        )

    def now(self) -> datetime:
        """The time on this recorder's clock (the one its events are stamped with)."""
        return self._clock()

    def _stamp(self) -> dict[str, Any]:
        """What every builder takes from this recorder: the time on its clock, the server's name,
        address and site."""
        return {
            "recorded": self._clock(),
            "server_name": self.server_name,
            "server_address": self.server_address,
            "site": self.site,
        }

    def emit(self, event: dict[str, Any]) -> None:
        """Hand one built event to the sink (for events not stored with a write of their own)."""
        if self._sink is None:
            raise RuntimeError("this AuditRecorder has no sink to record events to")
        self._sink(event)

    def record_token_grant(
        self,
        client_id: str | None,
        outcome: str,
        reason: str | None,
        source_address: str | None,
        scopes: str | None,
        *,
        token_id: str | None = None,
        grant_type: str = "client_credentials",
    ) -> None:
        """Record one token request, granted (``success``) or not (``refused``/``failed`` + reason).

        ``scopes`` is the space-separated ``scope`` the client asked for; ``token_id`` the ``jti`` of
        the token issued. See :func:`build_token_grant_event`.
        """
        self.emit(
            self.token_grant_event(
                client_id, outcome, reason, source_address, scopes, token_id=token_id, grant_type=grant_type
            )
        )

    def token_grant_event(
        self,
        client_id: str | None,
        outcome: str,
        reason: str | None,
        source_address: str | None,
        scopes: str | None,
        *,
        token_id: str | None = None,
        grant_type: str = "client_credentials",
    ) -> dict[str, Any]:
        """:func:`build_token_grant_event` with this server's defaults (built, not recorded)."""
        return build_token_grant_event(
            outcome=outcome,
            client_id=client_id,
            scopes=scopes,
            source_address=source_address,
            failure_reason=reason,
            token_id=token_id,
            grant_type=grant_type,
            **self._stamp(),
        )

    def record_authorization(
        self,
        step: str,
        outcome: str,
        *,
        client_id: str | None,
        person: str | None,
        patient: str | None,
        scopes: str | None,
        reason: str | None,
        source_address: str | None,
        token_id: str | None = None,
    ) -> None:
        """Record one step of SMART App Launch (see :func:`build_authorization_event`): ``step`` one of
        :data:`AUTHORIZATION_STEPS`, ``person`` ``Patient/x`` or ``Practitioner/y``, ``patient`` the
        patient in context, ``reason`` why it was refused (None on success)."""
        self.emit(
            build_authorization_event(
                step=step,
                outcome=outcome,
                client_id=client_id,
                person=person,
                patient=patient,
                scopes=scopes,
                source_address=source_address,
                failure_reason=reason,
                token_id=token_id,
                **self._stamp(),
            )
        )

    def authentication_refused(
        self, reason: str, source_address: str | None, request_id: str | None = None
    ) -> dict[str, Any]:
        """:func:`build_authentication_refusal` with this server's defaults (built, not recorded)."""
        return build_authentication_refusal(
            failure_reason=reason,
            source_address=source_address,
            request_id=request_id,
            **self._stamp(),
        )

    def refusal_summary(
        self, kind: str, source_address: str | None, count: int, first: datetime, last: datetime
    ) -> dict[str, Any]:
        """The event standing for ``count`` refusals of ``kind`` (:data:`TOKEN_GRANT`,
        :data:`AUTHENTICATION` or :data:`THROTTLED`) from ``source_address`` (None: from addresses
        the aggregation had no room for), between ``first`` and ``last``; see :func:`counting_repeats`."""
        where = f"from {source_address}" if source_address else "from other addresses"
        reason = f"{count} more refused requests ({kind}) {where}, counted, not recorded one by one"
        if kind == TOKEN_GRANT:
            event = self.token_grant_event(None, REFUSED, reason, source_address, None)
        else:
            event = self.authentication_refused(reason, source_address)
        return counting_repeats(event, count=count, first=first, last=last)
