"""HTTP adapters of the authorization server: the token endpoint, revocation, introspection, EHR
launch handles, SMART and OpenID discovery and our JWK Set.

- ``POST /auth/token`` (form-encoded; RFC 6749 5.1/5.2 JSON answers): ``client_credentials`` (SMART
  Backend Services), ``authorization_code`` (PKCE S256; public apps send ``client_id``,
  confidential-asymmetric apps a ``private_key_jwt`` assertion whose ``aud`` is this endpoint) and
  ``refresh_token`` (rotated on every use). https://hl7.org/fhir/smart-app-launch/app-launch.html
- ``POST /auth/revoke`` (RFC 7009): ``token`` (+ ``token_type_hint``), the same client authentication;
  revokes the token's whole grant; an unknown token is answered 200.
- ``POST /auth/introspect`` (RFC 7662): the caller is a resource server or EHR with a Bearer access
  token carrying a ``system/`` scope, or a client proving itself by assertion (an app sees its own
  tokens only).
- ``POST /auth/launch``: an EHR (a backend-services Bearer token with a ``system/`` scope that reads
  Patient) asks for a launch handle. Body (JSON or form): ``patient`` (required), ``encounter``,
  ``practitioner`` (ids or references such as ``Patient/1``), ``client_id`` (the app it is for;
  otherwise any app with the EHR launch). Answer ``{"launch": "<handle>", "expires_in": N}``; errors
  ``{"error": "invalid_request" | "invalid_token" | "insufficient_scope", "error_description": ...}``.
  The handle is single-use and lives ``launch_seconds``.
- ``GET /.well-known/smart-configuration`` (and under the FHIR base, where SMART clients look:
  ``/fhir/.well-known/smart-configuration``): https://hl7.org/fhir/smart-app-launch/conformance.html
- ``GET /auth/.well-known/openid-configuration``: OpenID Provider metadata for our ``id_token``.
- ``GET /.well-known/jwks.json``: the public keys that verify our access tokens and id_tokens.

The token, revocation and introspection endpoints answer CORS for any origin without credentials
(browser apps are public clients), including the ``OPTIONS`` preflight.

Reads from ``request.app.state`` (set by :func:`fhir_norse.api.auth_setup.install_auth`):
``settings`` (``base_url``), ``token_service`` (:class:`TokenService`), ``grants``
(:class:`~fhir_norse.auth.grants.Grants`), ``key_store`` (:class:`KeyStore`), ``token_verifier``,
``authenticator``, ``token_rate_limiter`` (a :class:`~fhir_norse.auth.ratelimit.Limiter`, per
client address), ``service`` (the FHIR service, for ``/auth/launch``) and, if present, ``audit``
(``record_token_grant(client_id, outcome, reason, source_address, scopes)`` with outcome
``"success"`` or ``"refused"``, plus ``token_id=<jti>`` on success if it takes one; and
``record_authorization(step, outcome, *, client_id, person, patient, scopes, reason, source_address,
token_id)`` for the SMART App Launch steps) and ``refusal_audit``
(:class:`~fhir_norse.auth.refusals.RefusalAudit`): with it, a request refused before the client
proved itself is audited aggregated per address, not one by one.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from fhir_norse.api.deps import base_url, client_address, write_refusals
from fhir_norse.auth.caller import Caller
from fhir_norse.auth.clients import BACKEND, CONFIDENTIAL, Client
from fhir_norse.auth.grants import Grants, Introspection, TokenGrant, authenticate_app
from fhir_norse.auth.ratelimit import retry_after_header
from fhir_norse.auth.refusals import RefusalAudit
from fhir_norse.auth.scopes import ScopeSet
from fhir_norse.auth.tokens import (
    ASSERTION_ALGORITHMS,
    GRANT_TYPE,
    OAuthError,
    RequestAuthenticator,
    TokenService,
    issuer_for,
    jwks_uri_for,
    server_root,
    token_endpoint_for,
)
from fhir_norse.outcomes import FhirError
from fhir_norse.server.context import RequestContext

router = APIRouter(include_in_schema=True, tags=["authorization"])

FORM_TYPE = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"
MAX_FORM_BYTES = 64 * 1024
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# Any origin, never credentials: browser apps are public clients (SMART: "CORS is required" on the
# token endpoint). The app-wide CORS for the FHIR API is configured separately (cors_origins).
CORS = {"Access-Control-Allow-Origin": "*"}
CORS_PREFLIGHT = {
    **CORS,
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}
AUTHORIZATION_CODE = "authorization_code"
REFRESH_TOKEN = "refresh_token"
GRANT_TYPES = [AUTHORIZATION_CODE, REFRESH_TOKEN, GRANT_TYPE]
# What clients may ask for: identity, launch and refresh scopes; patient/ and user/ scopes for apps;
# system/ scopes for backend clients (in the SMART v2 and v1 forms; any resource type in place of *).
SCOPES_SUPPORTED = [
    "openid",
    "fhirUser",
    "profile",
    "launch",
    "launch/patient",
    "launch/encounter",
    "offline_access",
    "online_access",
    "patient/*.rs",
    "patient/*.cruds",
    "patient/*.read",
    "user/*.rs",
    "user/*.cruds",
    "user/*.read",
    "system/*.cruds",
    "system/*.rs",
    "system/*.read",
    "system/*.write",
    "system/*.*",
]
# Outcomes as fhir_norse.auth.audit names them (a refused grant is a "minor failure" there).
SUCCESS = "success"
REFUSED = "refused"
CAPABILITIES = [
    "launch-ehr",
    "launch-standalone",
    "client-public",
    "client-confidential-asymmetric",
    "context-ehr-patient",
    "context-ehr-encounter",
    "context-standalone-patient",
    "context-banner",
    "permission-v2",
    "permission-v1",
    "permission-patient",
    "permission-user",
    "permission-offline",
    "permission-online",
    "sso-openid-connect",
    "authorize-post",
]
OIDC_CLAIMS = ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "fhirUser"]


def _oauth_error(error: OAuthError, cors: bool = False) -> JSONResponse:
    headers = {**NO_STORE, **error.headers, **(CORS if cors else {})}
    return JSONResponse(error.to_json(), status_code=error.status, headers=headers)


async def _read_body(request: Request, *, allow_json: bool = False) -> bytes:
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != FORM_TYPE and not (allow_json and content_type == JSON_TYPE):
        wanted = FORM_TYPE + (f" or {JSON_TYPE}" if allow_json else "")
        raise OAuthError(400, "invalid_request", f"the request must be sent as {wanted}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_FORM_BYTES:
        raise OAuthError(400, "invalid_request", "the request is too large")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_FORM_BYTES:
            raise OAuthError(400, "invalid_request", "the request is too large")
    return bytes(body)


def _parse_form(body: bytes) -> dict[str, str]:
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        raise OAuthError(400, "invalid_request", "the request body cannot be read") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            # RFC 6749 section 3.2: parameters MUST NOT be included more than once.
            raise OAuthError(400, "invalid_request", f"parameter {name[:40]!r} appears more than once")
        form[name] = value
    return form


async def _read_form(request: Request) -> dict[str, str]:
    return _parse_form(await _read_body(request))


async def _audit(
    request: Request,
    client_id: str | None,
    outcome: str,
    reason: str | None,
    scopes: str | None,
    token_id: str | None = None,
) -> None:
    """Record the grant or refusal (never the assertion or the token; the token's jti if granted)."""
    audit = getattr(request.app.state, "audit", None)
    if audit is None:
        return
    record = audit.record_token_grant
    args = (client_id, outcome, reason, client_address(request), scopes)
    kwargs: dict[str, Any] = {}
    if token_id is not None and "token_id" in inspect.signature(record).parameters:
        kwargs["token_id"] = token_id
    if inspect.iscoroutinefunction(record):
        await record(*args, **kwargs)
    else:
        await run_in_threadpool(record, *args, **kwargs)


async def audit_step(
    request: Request,
    step: str,
    outcome: str,
    *,
    client_id: str | None,
    person: str | None = None,
    patient: str | None = None,
    scopes: str | None = None,
    reason: str | None = None,
    token_id: str | None = None,
) -> None:
    """Record one SMART App Launch step (``record_authorization``; never a token or a code)."""
    audit = getattr(request.app.state, "audit", None)
    record = getattr(audit, "record_authorization", None)
    if record is None:
        return
    await run_in_threadpool(
        lambda: record(
            step,
            outcome,
            client_id=client_id,
            person=person,
            patient=patient,
            scopes=scopes,
            reason=reason,
            source_address=client_address(request),
            token_id=token_id,
        )
    )


async def _audit_refusal(request: Request, error: OAuthError, scopes: str | None) -> None:
    """Record a refused token request: one by one if the client had proved itself, else aggregated."""
    reason = f"{error.error}: {error.description}"
    refusals: RefusalAudit | None = getattr(request.app.state, "refusal_audit", None)
    if refusals is None or error.authenticated:
        await _audit(request, error.client_id, REFUSED, reason, scopes)
        return
    await write_refusals(
        refusals, refusals.token_refused(client_address(request), error.client_id, reason, scopes)
    )


async def _step_refusal(request: Request, step: str, error: OAuthError, scopes: str | None = None) -> None:
    """A refused SMART step: one by one once a registered app is known (``authenticated``), else
    aggregated per address like other unauthenticated refusals."""
    refusals: RefusalAudit | None = getattr(request.app.state, "refusal_audit", None)
    if refusals is not None and not error.authenticated:
        await _audit_refusal(request, error, scopes)
        return
    reason = f"{error.error}: {error.description}"
    await audit_step(request, step, REFUSED, client_id=error.client_id, scopes=scopes, reason=reason)


async def _throttled(request: Request) -> Response | None:
    """The 429 answer (audited as a refused token request) when this address asked too often."""
    limited = await _address_limit(request)
    if limited is None:
        return None
    await _audit_refusal(request, limited, None)
    return _oauth_error(limited, cors=True)


async def _address_limit(request: Request) -> OAuthError | None:
    limiter = getattr(request.app.state, "token_rate_limiter", None)
    if limiter is None:
        return None
    wait = await run_in_threadpool(limiter.hit, client_address(request) or "unknown")
    if wait is None:
        return None
    return OAuthError(
        429,
        "temporarily_unavailable",
        "too many token requests from this address",
        headers={"Retry-After": retry_after_header(wait)},
    )


# -- the token endpoint -------------------------------------------------------------------------
@router.post("/auth/token", response_model=None)
async def token(request: Request) -> Response:
    """The token endpoint: client_credentials, authorization_code (PKCE) and refresh_token."""
    throttled = await _throttled(request)
    if throttled is not None:
        return throttled
    state = request.app.state
    service: TokenService = state.token_service
    base = base_url(request)
    form: dict[str, str] = {}
    try:
        form = await _read_form(request)
        grant_type = form.get("grant_type")
        if grant_type in (AUTHORIZATION_CODE, REFRESH_TOKEN):
            return await _app_token(request, form, grant_type, base)
        grant = await run_in_threadpool(service.authorize, form, token_endpoint_for(base), base)
    except OAuthError as error:
        if error.error == "unsupported_grant_type":
            error.description = f"grant_type must be one of {', '.join(GRANT_TYPES)}"
        await _audit_refusal(request, error, form.get("scope"))
        return _oauth_error(error, cors=True)
    await _audit(request, grant.client_id, SUCCESS, None, grant.scope, grant.token_id)
    return JSONResponse(grant.response, headers={**NO_STORE, **CORS})


async def _app_token(request: Request, form: dict[str, str], grant_type: str, base: str) -> Response:
    """authorization_code or refresh_token for an app; audited as the SMART step of that name."""
    state = request.app.state
    grants: Grants = state.grants

    def run() -> TokenGrant:
        client = authenticate_app(state.token_service, form, token_endpoint_for(base))
        if grant_type == AUTHORIZATION_CODE:
            return grants.exchange_code(
                client,
                form.get("code", ""),
                form.get("redirect_uri", ""),
                form.get("code_verifier", ""),
                base,
            )
        return grants.refresh(client, form.get("refresh_token", ""), form.get("scope"), base)

    try:
        granted = await run_in_threadpool(run)
    except OAuthError as error:
        await _step_refusal(request, grant_type, error, form.get("scope"))
        return _oauth_error(error, cors=True)
    await audit_step(
        request,
        grant_type,
        SUCCESS,
        client_id=granted.client_id,
        person=granted.person,
        patient=granted.patient,
        scopes=granted.scope,
        token_id=granted.token_id,
    )
    return JSONResponse(granted.response, headers={**NO_STORE, **CORS})


@router.options("/auth/token", response_model=None)
@router.options("/auth/revoke", response_model=None)
@router.options("/auth/introspect", response_model=None)
async def preflight(_request: Request) -> Response:
    """CORS preflight of the endpoints browser apps call (any origin, no credentials)."""
    return Response(status_code=204, headers=CORS_PREFLIGHT)


# -- revocation (RFC 7009) ----------------------------------------------------------------------
@router.post("/auth/revoke", response_model=None)
async def revoke(request: Request) -> Response:
    """RFC 7009: revoke a refresh or access token of the calling app (and with it its grant)."""
    throttled = await _throttled(request)
    if throttled is not None:
        return throttled
    state = request.app.state
    grants: Grants = state.grants
    base = base_url(request)
    try:
        form = await _read_form(request)
        if not form.get("token"):
            raise OAuthError(400, "invalid_request", "token is required")
        client = await run_in_threadpool(
            authenticate_app, state.token_service, form, token_endpoint_for(base)
        )
        revoked = await run_in_threadpool(
            grants.revoke_token, client, form["token"], state.token_verifier, base
        )
    except OAuthError as error:
        await _step_refusal(request, "revoke", error)
        return _oauth_error(error, cors=True)
    if revoked is not None:
        await audit_step(request, "revoke", SUCCESS, client_id=client.client_id)
    # RFC 7009 2.2: 200 whether or not the token was known (an invalid token is not an error).
    return Response(status_code=200, headers={**NO_STORE, **CORS})


# -- introspection (RFC 7662) -------------------------------------------------------------------
def _has_system_scope(caller: Caller) -> bool:
    return caller.source == "token" and "system" in ScopeSet.parse(caller.scopes).contexts()


async def _introspecting_client(
    request: Request, form: Mapping[str, str], base: str
) -> tuple[str, str | None]:
    """Who asks (client id) and whose tokens it may see (None: anyone's). RFC 7662 2.1: the caller
    authenticates; here with a Bearer token holding a system/ scope, or a client assertion."""
    state = request.app.state
    header = request.headers.get("authorization")
    if header:
        authenticator: RequestAuthenticator = state.authenticator
        try:
            caller = await run_in_threadpool(
                authenticator.authenticate, header, client_address(request), base
            )
        except FhirError as error:
            raise OAuthError(
                error.status,
                "invalid_token",
                error.message,
                headers={"WWW-Authenticate": 'Bearer realm="fhir-norse", error="invalid_token"'},
            ) from None
        if not _has_system_scope(caller):
            raise OAuthError(
                403,
                "insufficient_scope",
                "introspection needs an access token with a system/ scope",
                client_id=caller.client_id,
                authenticated=True,
            )
        return caller.client_id, None
    if not form.get("client_assertion"):
        raise OAuthError(
            401,
            "invalid_client",
            "authenticate with a Bearer access token (system/ scope) or a client_assertion",
            headers={"WWW-Authenticate": 'Bearer realm="fhir-norse"'},
        )
    service: TokenService = state.token_service
    client: Client = await run_in_threadpool(service.authenticate_client, form, token_endpoint_for(base))
    if client.kind == BACKEND:
        return client.client_id, None
    if client.kind == CONFIDENTIAL:
        return client.client_id, client.client_id
    raise OAuthError(401, "invalid_client", "this client cannot authenticate", client_id=client.client_id)


@router.post("/auth/introspect", response_model=None)
async def introspect(request: Request) -> Response:
    """RFC 7662: whether a token is active, and what it grants."""
    state = request.app.state
    grants: Grants = state.grants
    base = base_url(request)
    try:
        form = await _read_form(request)
        caller_id, only = await _introspecting_client(request, form, base)
        if not form.get("token"):
            raise OAuthError(
                400, "invalid_request", "token is required", client_id=caller_id, authenticated=True
            )
    except OAuthError as error:
        await _step_refusal(request, "introspect", error)
        return _oauth_error(error, cors=True)
    answer: Introspection = await run_in_threadpool(
        lambda: grants.introspect(form["token"], state.token_verifier, base, client_id=only)
    )
    await audit_step(
        request,
        "introspect",
        SUCCESS,
        client_id=caller_id,
        person=answer.person,
        patient=answer.patient,
        scopes=answer.response.get("scope"),
    )
    return JSONResponse(answer.response, headers={**NO_STORE, **CORS})


# -- EHR launch ---------------------------------------------------------------------------------
def _bare_id(value: Any, resource_type: str, required: bool = False) -> str | None:
    """An id given as ``1`` or ``Patient/1``; :class:`OAuthError` if malformed (or missing when required)."""
    if value is None or value == "":
        if required:
            raise OAuthError(400, "invalid_request", f"{resource_type.lower()} is required")
        return None
    if not isinstance(value, str):
        raise OAuthError(400, "invalid_request", f"{resource_type.lower()} must be a string")
    bare = value.removeprefix(f"{resource_type}/")
    if "/" in bare or not bare or len(bare) > 64 or not all(c.isalnum() or c in "-." for c in bare):
        raise OAuthError(
            400, "invalid_request", f"{resource_type.lower()} must be an id or {resource_type}/<id>"
        )
    return bare


async def _launch_body(request: Request) -> dict[str, Any]:
    raw = await _read_body(request, allow_json=True)
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type == JSON_TYPE:
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise OAuthError(400, "invalid_request", "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise OAuthError(400, "invalid_request", "the request body must be a JSON object")
        return body
    return dict(_parse_form(raw))


def _exists(request: Request, resource_type: str, resource_id: str, base: str) -> bool:
    service = request.app.state.service
    context = RequestContext(caller=Caller.operator(), base_url=base, source_address=client_address(request))
    try:
        service.read(context, resource_type, resource_id)
    except FhirError:
        return False
    return True


@router.post("/auth/launch", response_model=None)
async def launch(request: Request) -> Response:
    """A launch handle for an EHR launch (the EHR opens the app with ``iss`` and ``launch``)."""
    state = request.app.state
    base = base_url(request)
    authenticator: RequestAuthenticator = state.authenticator
    caller_id: str | None = None
    try:
        try:
            caller: Caller = await run_in_threadpool(
                authenticator.authenticate,
                request.headers.get("authorization"),
                client_address(request),
                base,
            )
        except FhirError as error:
            raise OAuthError(
                error.status,
                "invalid_token",
                error.message,
                headers={
                    "WWW-Authenticate": error.headers.get("WWW-Authenticate", 'Bearer realm="fhir-norse"')
                },
            ) from None
        caller_id = caller.client_id
        if caller.source != "token" or not ScopeSet.parse(caller.scopes).allows("system", "Patient", "r"):
            raise OAuthError(
                403,
                "insufficient_scope",
                "a launch needs a backend services token with a system/ scope that reads Patient",
                client_id=caller_id,
                authenticated=True,
            )
        body = await _launch_body(request)
        patient = _bare_id(body.get("patient"), "Patient", required=True)
        encounter = _bare_id(body.get("encounter"), "Encounter")
        practitioner = _bare_id(body.get("practitioner"), "Practitioner")
        app_id = body.get("client_id") or None
        assert patient is not None
        await _check_launch(request, base, patient, encounter, practitioner, app_id)
        grants: Grants = state.grants
        handle, lifetime = await run_in_threadpool(
            lambda: grants.create_launch(
                created_by=caller.client_id,
                patient=patient,
                encounter=encounter,
                practitioner=practitioner,
                client_id=app_id,
            )
        )
    except OAuthError as error:
        if caller_id is not None:
            error.client_id, error.authenticated = caller_id, True
        await _step_refusal(request, "launch", error)
        return _oauth_error(error)
    await audit_step(
        request,
        "launch",
        SUCCESS,
        client_id=caller.client_id,
        person=f"Practitioner/{practitioner}" if practitioner else None,
        patient=patient,
    )
    return JSONResponse({"launch": handle, "expires_in": lifetime}, headers=NO_STORE)


async def _check_launch(
    request: Request,
    base: str,
    patient: str,
    encounter: str | None,
    practitioner: str | None,
    app_id: Any,
) -> None:
    for resource_type, resource_id in (
        ("Patient", patient),
        ("Encounter", encounter),
        ("Practitioner", practitioner),
    ):
        if resource_id is not None and not await run_in_threadpool(
            _exists, request, resource_type, resource_id, base
        ):
            raise OAuthError(400, "invalid_request", f"no {resource_type} with id {resource_id}")
    if app_id is None:
        return
    if not isinstance(app_id, str) or len(app_id) > 64:
        raise OAuthError(400, "invalid_request", "client_id must be the id of a registered app")
    app = await run_in_threadpool(request.app.state.clients.get, app_id)
    if app is None or not app.active or not app.is_app or "ehr" not in app.launch_types:
        raise OAuthError(
            400, "invalid_request", "client_id is not an active app registered for the EHR launch"
        )


# -- discovery ----------------------------------------------------------------------------------
def _issuer(request: Request) -> str:
    return issuer_for(base_url(request), request.app.state.token_service.issuer)


def smart_configuration(request: Request) -> dict[str, Any]:
    """What this server does, and nothing it does not
    (https://hl7.org/fhir/smart-app-launch/conformance.html)."""
    base = base_url(request)
    root = server_root(base)
    return {
        "issuer": _issuer(request),
        "jwks_uri": jwks_uri_for(base),
        "authorization_endpoint": root + "/auth/authorize",
        "token_endpoint": token_endpoint_for(base),
        "revocation_endpoint": root + "/auth/revoke",
        "introspection_endpoint": root + "/auth/introspect",
        "grant_types_supported": list(GRANT_TYPES),
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
        "code_challenge_methods_supported": ["S256"],
        "response_types_supported": ["code"],
        "scopes_supported": list(SCOPES_SUPPORTED),
        "capabilities": list(CAPABILITIES),
    }


def openid_configuration(request: Request) -> dict[str, Any]:
    """OpenID Provider metadata (OpenID Connect Discovery 1.0 3) for verifying our id_token."""
    base = base_url(request)
    root = server_root(base)
    return {
        "issuer": _issuer(request),
        "jwks_uri": jwks_uri_for(base),
        "authorization_endpoint": root + "/auth/authorize",
        "token_endpoint": token_endpoint_for(base),
        "revocation_endpoint": root + "/auth/revoke",
        "introspection_endpoint": root + "/auth/introspect",
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": [AUTHORIZATION_CODE, REFRESH_TOKEN],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": ["openid", "fhirUser", "profile", "offline_access", "online_access"],
        "claims_supported": list(OIDC_CLAIMS),
        "claims_parameter_supported": False,
        "request_parameter_supported": False,
        "request_uri_parameter_supported": False,
    }


@router.get("/.well-known/smart-configuration", response_model=None)
@router.get("/fhir/.well-known/smart-configuration", response_model=None)
async def well_known_smart_configuration(request: Request) -> Response:
    return JSONResponse(
        smart_configuration(request), headers={"Cache-Control": "public, max-age=300", **CORS}
    )


@router.get("/auth/.well-known/openid-configuration", response_model=None)
async def well_known_openid_configuration(request: Request) -> Response:
    return JSONResponse(
        openid_configuration(request), headers={"Cache-Control": "public, max-age=300", **CORS}
    )


@router.get("/.well-known/jwks.json", response_model=None)
async def well_known_jwks(request: Request) -> Response:
    jwks = await run_in_threadpool(request.app.state.key_store.public_jwks)
    return JSONResponse(jwks, headers={"Cache-Control": "public, max-age=60", **CORS})


__all__ = ["CAPABILITIES", "SCOPES_SUPPORTED", "router"]
