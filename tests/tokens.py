"""Access tokens for tests, signed by the app's own key (as ``fhir-norse token`` mints them)."""

from __future__ import annotations

from fastapi import FastAPI


def bearer(app: FastAPI, scope: str = "system/*.cruds", **context: str) -> dict[str, str]:
    """An Authorization header for ``scope``; ``patient=`` or ``practitioner=`` add launch context."""
    token, _jti = app.state.token_service.issue(
        subject="test-operator",
        client_id="test-operator",
        scope=scope,
        audience="http://testserver/fhir",
        **context,
    )
    return {"Authorization": f"Bearer {token}"}
