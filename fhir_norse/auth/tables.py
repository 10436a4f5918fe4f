"""Tables of the authorization server: our signing keys, registered backend clients, used assertion ids.

They live in :data:`fhir_norse.store.tables.METADATA` (``SQLModel.metadata``) beside the resource
tables and are created by the Alembic revision ``0002``. Timestamps are naive UTC, as elsewhere.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from fhir_norse.store.tables import METADATA

__all__ = ["AUTH_TABLES", "METADATA", "ClientRow", "RateWindowRow", "SigningKeyRow", "UsedJtiRow"]


class SigningKeyRow(SQLModel, table=True):
    """One of the server's own key pairs for signing access tokens.

    The newest row without ``retire_after`` signs; every row whose ``retire_after`` is unset or
    still ahead verifies and is published at ``/.well-known/jwks.json``.
    """

    __tablename__ = "auth_signing_key"

    kid: str = Field(sa_column=sa.Column(sa.String(64), primary_key=True))
    alg: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    # PKCS#8 PEM, encrypted with the configured passphrase (never stored in clear).
    private_key_pem: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    public_jwk: Any = Field(sa_column=sa.Column(sa.JSON, nullable=False))
    created_at: datetime = Field(sa_column=sa.Column(sa.DateTime, nullable=False))
    retire_after: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime, nullable=True))


class ClientRow(SQLModel, table=True):
    """A registered SMART Backend Services client and the public keys it signs assertions with."""

    __tablename__ = "auth_client"

    client_id: str = Field(sa_column=sa.Column(sa.String(64), primary_key=True))
    name: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    jwks: Any = Field(sa_column=sa.Column(sa.JSON, nullable=False))
    # Space-separated, as in the OAuth ``scope`` parameter.
    scopes: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    created_at: datetime = Field(sa_column=sa.Column(sa.DateTime, nullable=False))
    revoked_at: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime, nullable=True))
    # Revision 0009 (SMART App Launch): "backend" (client_credentials), "public" (authorization code
    # with PKCE, no secret) or "confidential-asymmetric" (authorization code, private_key_jwt).
    kind: str = Field(
        default="backend",
        sa_column=sa.Column(sa.String(32), nullable=False, server_default="backend"),
    )
    # The redirect URIs an app registered (matched exactly), and the launches it may use
    # ("ehr", "standalone").
    redirect_uris: Any = Field(
        default_factory=list, sa_column=sa.Column(sa.JSON, nullable=False, server_default="[]")
    )
    launch_types: Any = Field(
        default_factory=list, sa_column=sa.Column(sa.JSON, nullable=False, server_default="[]")
    )


class UsedJtiRow(SQLModel, table=True):
    """A client assertion ``jti`` already accepted; the primary key refuses a replay."""

    __tablename__ = "auth_used_jti"
    __table_args__ = (sa.Index("ix_auth_used_jti_expires", "expires_at"),)

    client_id: str = Field(
        sa_column=sa.Column(
            sa.String(64), sa.ForeignKey("auth_client.client_id", ondelete="CASCADE"), primary_key=True
        )
    )
    jti: str = Field(sa_column=sa.Column(sa.String(255), primary_key=True))
    expires_at: datetime = Field(sa_column=sa.Column(sa.DateTime, nullable=False))


class RateWindowRow(SQLModel, table=True):
    """Requests counted by a rate limit in one fixed window of time, shared by every server worker
    (:class:`fhir_norse.auth.ratelimit.SharedRateLimiter`; revision ``0004``).

    ``slot`` is the window's number (``epoch seconds // period``); rows of past windows are deleted.
    """

    __tablename__ = "auth_rate_window"

    limiter: str = Field(sa_column=sa.Column(sa.String(32), primary_key=True))
    key: str = Field(sa_column=sa.Column(sa.String(128), primary_key=True))
    slot: int = Field(sa_column=sa.Column(sa.BigInteger, primary_key=True, autoincrement=False))
    hits: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))


AUTH_TABLES: tuple[sa.Table, ...] = (
    SigningKeyRow.__table__,  # type: ignore[attr-defined]
    ClientRow.__table__,  # type: ignore[attr-defined]
    UsedJtiRow.__table__,  # type: ignore[attr-defined]
    RateWindowRow.__table__,  # type: ignore[attr-defined]
)
