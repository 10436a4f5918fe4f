"""HTTP adapters of the authorization server: the token endpoint, SMART discovery and our JWK Set.

- ``POST /auth/token``: SMART Backend Services token request (form-encoded), OAuth 2 JSON errors.
- ``GET /.well-known/smart-configuration`` (and under the FHIR base, where SMART clients look:
  ``/fhir/.well-known/smart-configuration``): https://hl7.org/fhir/smart-app-launch/conformance.html
- ``GET /.well-known/jwks.json``: the public keys that verify our access tokens.

Reads from ``request.app.state`` (set by :func:`fhir_norse.api.auth_setup.install_auth`):
``settings`` (``base_url``), ``token_service`` (:class:`TokenService`), ``key_store``
(:class:`KeyStore`), ``token_rate_limiter`` (a :class:`~fhir_norse.auth.ratelimit.Limiter`, per
client address) and, if present, ``audit``
(``record_token_grant(client_id, outcome, reason, source_address, scopes)`` with outcome
``"success"`` or ``"refused"``, plus ``token_id=<jti>`` on success if it takes one)
and ``refusal_audit`` (:class:`~fhir_norse.auth.refusals.RefusalAudit`): with it, a request
refused before the client proved itself is audited aggregated per address, not one by one.
"""

from __future__ import annotations

import inspect
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from fhir_norse.api.deps import base_url, client_address, write_refusals
from fhir_norse.auth.ratelimit import retry_after_header
from fhir_norse.auth.refusals import RefusalAudit
from fhir_norse.auth.tokens import (
    ASSERTION_ALGORITHMS,
    GRANT_TYPE,
    OAuthError,
    TokenService,
    jwks_uri_for,
    token_endpoint_for,
)

router = APIRouter(include_in_schema=True, tags=["authorization"])

FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 64 * 1024
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# What a backend client may ask for: client_credentials carries no user and no patient, so only
# system/ scopes, in the SMART v2 and v1 forms (any resource type in place of ``*``).
SCOPES_SUPPORTED = ["system/*.cruds", "system/*.rs", "system/*.read", "system/*.write", "system/*.*"]
# Outcomes as fhir_norse.auth.audit names them (a refused grant is a "minor failure" there).
SUCCESS = "success"
REFUSED = "refused"
CAPABILITIES = ["client-confidential-asymmetric", "permission-v2", "permission-v1"]


def _oauth_error(error: OAuthError) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.status, headers={**NO_STORE, **error.headers})


async def _read_form(request: Request) -> dict[str, str]:
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != FORM_TYPE:
        raise OAuthError(400, "invalid_request", f"the token request must be sent as {FORM_TYPE}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_FORM_BYTES:
        raise OAuthError(400, "invalid_request", "the token request is too large")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_FORM_BYTES:
            raise OAuthError(400, "invalid_request", "the token request is too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        raise OAuthError(400, "invalid_request", "the token request body cannot be read") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            # RFC 6749 section 3.2: parameters MUST NOT be included more than once.
            raise OAuthError(400, "invalid_request", f"parameter {name[:40]!r} appears more than once")
        form[name] = value
    return form


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


@router.post("/auth/token", response_model=None)
async def token(request: Request) -> Response:
    """SMART Backend Services token request: client_credentials with a private_key_jwt assertion."""
    state = request.app.state
    limiter = getattr(state, "token_rate_limiter", None)
    if limiter is not None:
        wait = await run_in_threadpool(limiter.hit, client_address(request) or "unknown")
        if wait is not None:
            error = OAuthError(
                429,
                "temporarily_unavailable",
                "too many token requests from this address",
                headers={"Retry-After": retry_after_header(wait)},
            )
            await _audit_refusal(request, error, None)
            return _oauth_error(error)
    service: TokenService = state.token_service
    base = base_url(request)
    form: dict[str, str] = {}
    try:
        form = await _read_form(request)
        grant = await run_in_threadpool(service.authorize, form, token_endpoint_for(base), base)
    except OAuthError as error:
        await _audit_refusal(request, error, form.get("scope"))
        return _oauth_error(error)
    await _audit(request, grant.client_id, SUCCESS, None, grant.scope, grant.token_id)
    return JSONResponse(grant.response, headers=NO_STORE)


def smart_configuration(request: Request) -> dict[str, Any]:
    """What this server does, and nothing it does not. ``issuer`` is left out: SMART 2.x has it only
    with ``sso-openid-connect`` ("otherwise, omitted"); there is no authorization endpoint, so no
    ``authorization_endpoint`` nor ``code_challenge_methods_supported`` either."""
    base = base_url(request)
    return {
        "jwks_uri": jwks_uri_for(base),
        "token_endpoint": token_endpoint_for(base),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
        "grant_types_supported": [GRANT_TYPE],
        "scopes_supported": list(SCOPES_SUPPORTED),
        "response_types_supported": [],
        "capabilities": list(CAPABILITIES),
    }


@router.get("/.well-known/smart-configuration", response_model=None)
@router.get("/fhir/.well-known/smart-configuration", response_model=None)
async def well_known_smart_configuration(request: Request) -> Response:
    return JSONResponse(smart_configuration(request), headers={"Cache-Control": "public, max-age=300"})


@router.get("/.well-known/jwks.json", response_model=None)
async def well_known_jwks(request: Request) -> Response:
    jwks = await run_in_threadpool(request.app.state.key_store.public_jwks)
    return JSONResponse(jwks, headers={"Cache-Control": "public, max-age=60"})
