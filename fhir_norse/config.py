"""Settings from the environment (prefix ``FHIR_NORSE_``) and CLI flags.

Built by :func:`load_settings`, never as an import-time singleton, so tests and the CLI
each make their own.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SQLITE_PATH = Path("var") / "fhir-norse.sqlite3"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FHIR_NORSE_", extra="ignore")

    database_url: str = Field(
        default=f"sqlite:///{DEFAULT_SQLITE_PATH}",
        description="SQLAlchemy URL: sqlite:///path or postgresql+psycopg://user@host/db",
    )
    host: str = "127.0.0.1"
    port: int = 8080
    # The absolute base URL clients use, for fullUrl, Location and links, and the audience every
    # access token must name. When unset: http://<host>:<port>/fhir in production, never the request's
    # Host header; derived from the request in development mode only. Set it behind a reverse proxy.
    base_url: str | None = None
    max_body_bytes: int = 10 * 1024 * 1024
    # The longest request target (path and query) answered; longer ones get 414. httptools, the HTTP
    # parser uvicorn uses, refuses request lines past 64 KiB itself, hence the upper bound.
    max_url_length: int = Field(default=16 * 1024, ge=1024, le=60 * 1024)
    default_count: int = 50
    max_count: int = 1000
    # Bounds on one search (README, "Limits"): name=value pairs, values of all criteria together
    # (comma-separated alternatives count one each), and the database time a search may take.
    search_max_parameters: int = Field(default=50, gt=0)
    search_max_values: int = Field(default=200, gt=0)
    search_timeout_seconds: float = Field(default=10.0, gt=0)
    # R4 search parameters indexed and answered on top of the advertised ones
    # (fhir_norse/store/search/advertised.py), comma-separated Type.code: "Observation.combo-code,...".
    # Run `fhir-norse reindex --type <Type>` after adding one so resources stored before are found.
    search_extra_parameters: str = ""
    # SQLite durability: FULL syncs the WAL on every commit, so a committed write survives a
    # power cut; NORMAL is faster but may lose the last commits on power loss.
    sqlite_synchronous: Literal["FULL", "NORMAL", "EXTRA"] = "FULL"
    sqlite_busy_timeout_ms: int = 30_000
    # Connections per server process (and as many more under a burst): `serve` runs one process per core.
    db_pool_size: int = Field(default=5, ge=1)
    # PostgreSQL: analyze tables whose rows changed by more than 10 % since their statistics were taken
    # (fhir_norse/store/maintenance.py), checked every this many seconds; 0 turns the check off.
    db_statistics_interval_s: float = Field(default=60.0, ge=0)
    log_level: str = "INFO"
    # Server processes of `fhir-norse serve` (each with its own app and connection pool; migrations
    # run once before they start). None: one per core (os.cpu_count()); 1: a single process.
    workers: int | None = Field(default=None, ge=1, le=256)
    # Production unless development is chosen explicitly: development accepts a built-in key
    # passphrase, production refuses to start without a real one.
    mode: Literal["development", "production"] = "production"

    # --- authorization (SMART on FHIR backend services) ---
    # Encrypts the server's private signing keys at rest. Required outside development mode.
    key_passphrase: SecretStr = SecretStr("")
    # The issuer of our access tokens; derived from base_url when unset.
    token_issuer: str | None = None
    # Lifetime of the access tokens POST /auth/token issues.
    token_ttl_seconds: int = Field(default=300, gt=0)
    # The longest lifetime of a token `fhir-norse token` mints; retired signing keys stay published
    # for the longest lifetime a token may have.
    mint_max_ttl_seconds: int = Field(default=24 * 3600, gt=0)
    # Token requests per client address and minute (POST /auth/token).
    token_rate_per_minute: int = 30
    # Failed FHIR authentications per minute, per address and per presented token, before further
    # failing attempts get 429 for a while (a valid token is always accepted).
    auth_failure_limit_per_minute: int = 20
    # Refused requests without a verified credential (401, 429, refused token requests) are audited
    # once per address, kind and window: the first in full, the rest as one event with a count.
    refusal_audit_window_seconds: float = Field(default=60.0, gt=0)
    # Reverse proxies (IP addresses or CIDR networks) whose X-Forwarded-For and X-Forwarded-Proto
    # are believed; empty (the default): none, the peer address is the client's.
    trusted_proxies: list[str] = Field(default_factory=list)
    # How stale the in-memory signing key set and revoked-client set may get (seconds).
    auth_cache_seconds: float = Field(default=30.0, ge=0)
    # A hospital identity provider whose tokens are accepted too (JWKS from a file; no network).
    oidc_issuer: str | None = None
    oidc_jwks_file: str | None = None
    oidc_audience: str | None = None
    # The content pack (questionnaires/, profiles/): this checkout unless another pack is named.
    content_dir: Path = PROJECT_ROOT
    # Publish the content pack at start-up (tests that do not need it turn this off).
    publish_content: bool = True
    # Browser origins allowed by CORS; empty (the default) turns CORS off.
    cors_origins: list[str] = Field(default_factory=list)

    # --- the patient's way in (issue 15): administrations, invitations, personal links, the web form ---
    # The clinic's name in invitation messages (the only thing a message says besides the link).
    clinic_name: str = "fhir-norse"
    # The absolute origin patients open links on (https://survey.example.no); default: base_url's origin.
    patient_base_url: str | None = None
    # How often the scheduler creates due Tasks, expires windows and sends messages; 0 turns it off.
    scheduler_interval_s: float = Field(default=30.0, ge=0)
    # SMS: "log" writes messages to the server log (development default), "twilio" sends through
    # Twilio's Programmable Messaging API, "off" sends none (production default when unset).
    sms_gateway: Literal["log", "twilio", "off"] | None = None
    twilio_account_sid: str | None = None
    twilio_auth_token: SecretStr = SecretStr("")
    # The sender: a phone number in E.164 or an alphanumeric sender id; or a Messaging Service SID.
    twilio_from: str | None = None
    twilio_messaging_service_sid: str | None = None
    twilio_api_base: str = "https://api.twilio.com"
    # E-mail: "log" (development default), "smtp", "off" (production default when unset).
    email_transport: Literal["log", "smtp", "off"] | None = None
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_username: str | None = None
    smtp_password: SecretStr = SecretStr("")
    # STARTTLS is required unless turned off explicitly (a relay on localhost).
    smtp_starttls: bool = True
    smtp_from: str | None = None
    # A CA bundle to trust for the SMTP server's certificate (default: the system's).
    smtp_ca_file: Path | None = None
    # A folder of site templates overriding the built-in ones (invitation/reminder x sms/email x nb/en).
    message_templates_dir: Path | None = None
    # No message is sent inside these hours, in messaging_timezone ("21:00-08:00"; empty: any time).
    messaging_quiet_hours: str = "21:00-08:00"
    messaging_timezone: str = "Europe/Oslo"
    # A reminder goes out if the Task is still open this long after the invitation; 0: no reminder.
    reminder_after_hours: float = Field(default=24.0, ge=0)
    # Sending attempts per message on gateway errors, with exponential backoff from the base delay.
    message_max_attempts: int = Field(default=5, ge=1)
    message_retry_base_s: float = Field(default=60.0, gt=0)
    # Personal links: lifetime (hours; default: until the Task's window closes), the browser session
    # a link opens (minutes, sliding), and an optional second step ("birthdate" or "sms-code").
    link_ttl_hours: float | None = Field(default=None, gt=0)
    link_session_minutes: int = Field(default=60, gt=0)
    link_second_factor: Literal["none", "birthdate", "sms-code"] = "none"
    # Failed link openings per address and minute before 429.
    link_failure_limit_per_minute: int = Field(default=10, gt=0)
    # Show the patient their scores on the thank-you page.
    patient_form_show_scores: bool = False

    # --- sign-in for apps and clinicians (issue 16: SMART App Launch) ---
    # Authorization codes live this long and are good for one exchange.
    authorization_code_seconds: int = Field(default=60, gt=0, le=600)
    # The browser's sign-in session at this server (server-side, sliding; short): an online_access
    # refresh token ends with it. An authorization request must be finished within the same time.
    signin_session_minutes: int = Field(default=30, gt=0)
    # Refresh tokens of offline_access grants (rotated on every use).
    refresh_token_days: float = Field(default=30.0, gt=0)
    # An EHR launch handle (POST /auth/launch) must be used within this time, once.
    launch_seconds: int = Field(default=300, gt=0)
    # The patients' login: an OpenID Connect provider (ID-porten in Norway). Discovery from the issuer's
    # /.well-known/openid-configuration; the client authenticates with its secret (client_secret_post)
    # or, when a key file (a private JWK) is set, with private_key_jwt. The verified identity claim
    # must match exactly one Patient.identifier of the system below.
    patient_login_name: str = "ID-porten"
    patient_login_issuer: str | None = None
    patient_login_client_id: str | None = None
    patient_login_client_secret: SecretStr = SecretStr("")
    patient_login_client_key_file: Path | None = None
    patient_login_scopes: str = "openid profile"
    patient_login_acr_values: str | None = "idporten-loa-high"
    patient_login_claim: str = "pid"
    patient_login_identifier_system: str = "urn:oid:2.16.578.1.12.4.1.4.1"
    # The clinicians' login (HelseID in Norway): the claim is the HPR number, matched to
    # Practitioner.identifier; user/ scopes reach the patients of their CareTeams and episodes.
    clinician_login_name: str = "HelseID"
    clinician_login_issuer: str | None = None
    clinician_login_client_id: str | None = None
    clinician_login_client_secret: SecretStr = SecretStr("")
    clinician_login_client_key_file: Path | None = None
    clinician_login_scopes: str = "openid profile helseid://scopes/identity/hpr_number"
    clinician_login_acr_values: str | None = None
    clinician_login_claim: str = "helseid://claims/hpr/hpr_number"
    clinician_login_identifier_system: str = "urn:oid:2.16.578.1.12.4.1.4.4"

    # --- the demo clinic (issue 17) ---
    # Load the demo clinic (`fhir-norse demo`: invented patients, a clinician, care teams) when a server in
    # development mode starts on a database without any Patient; ignored in production. `make serve` sets it.
    demo_on_empty: bool = False
    # Give every scored administration's DiagnosticReport its report as a PDF (presentedForm) and a
    # DocumentReference, in the scheduler's tick (fhir_norse/web/report/documents.py).
    report_documents: bool = True

    # --- Bulk Data export ($export; README "Bulk Data export") ---
    # Where export files are written (one folder per job); every server process must see the same folder.
    bulk_export_dir: Path = Path("var") / "bulk-export"
    # How long a finished export's files (and its status URL) stay; then the sweep deletes them.
    bulk_file_hours: float = Field(default=24.0, gt=0)
    # Resources per NDJSON file; a type with more is split into several files.
    bulk_file_lines: int = Field(default=100_000, gt=0)
    # How often each server process's export worker looks for queued jobs; 0: no worker thread.
    bulk_export_interval_s: float = Field(default=2.0, ge=0)
    # PostgreSQL: resources written this long before an export's snapshot are the latest it holds (writes
    # in flight may carry an earlier lastUpdated; the next _since export gets them). SQLite is exact.
    bulk_snapshot_grace_s: float = Field(default=1.0, ge=0)

    # --- topic-based Subscriptions (Subscriptions R5 Backport IG; fhir_norse/server/subscriptions) ---
    # How often the delivery worker looks for notifications to send (seconds); 0 turns it off.
    subscription_interval_s: float = Field(default=0.5, ge=0)
    # Retries after a failed delivery: this delay, doubled per consecutive failure, at most the maximum.
    subscription_retry_base_s: float = Field(default=5.0, ge=0)
    subscription_retry_max_s: float = Field(default=600.0, ge=0)
    # Consecutive failed deliveries after which a Subscription is set off (its owner restarts it).
    subscription_max_failures: int = Field(default=10, ge=1)
    # The longest a notification POST may take (seconds); a Subscription's backport-timeout may ask less.
    subscription_timeout_s: float = Field(default=10.0, gt=0)
    # Accept plain http endpoints on any host (tests, closed networks); by default https, or http to a
    # loopback address only.
    subscription_allow_http: bool = False

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, value: list[str]) -> list[str]:
        """Addresses or networks only (a host name or ``*`` would trust what anyone can claim),
        written as networks: ``10.0.0.1`` is ``10.0.0.1/32``."""
        try:
            return [str(ipaddress.ip_network(entry.strip(), strict=False)) for entry in value]
        except ValueError as exc:
            raise ValueError(f"trusted_proxies: not an IP address or network ({exc})") from None

    def worker_count(self) -> int:
        """The number of server processes: ``workers``, else one per core."""
        return self.workers or os.cpu_count() or 1

    def sms_transport(self) -> str:
        """The SMS gateway in use: as configured, else "log" in development and "off" in production."""
        return self.sms_gateway or ("log" if self.mode == "development" else "off")

    def mail_transport(self) -> str:
        """The e-mail transport in use: as configured, else "log" in development and "off" in production."""
        return self.email_transport or ("log" if self.mode == "development" else "off")

    def patient_origin(self) -> str:
        """The origin personal links are opened on: ``patient_base_url``, else the FHIR base's origin."""
        if self.patient_base_url:
            return self.patient_base_url.rstrip("/")
        from urllib.parse import urlsplit

        parts = urlsplit(self.fhir_base_url())
        return f"{parts.scheme}://{parts.netloc}"

    def fhir_base_url(self) -> str:
        """The FHIR base URL from configuration alone: ``base_url``, else this server's own address."""
        return (self.base_url or f"http://{self.host}:{self.port}/fhir").rstrip("/")

    @model_validator(mode="after")
    def _complete_transports(self) -> Settings:
        """A chosen gateway has what it needs; production never writes personal links to the log."""
        if self.sms_gateway == "twilio":
            if not self.twilio_account_sid or not self.twilio_auth_token.get_secret_value():
                raise ValueError("sms_gateway=twilio needs FHIR_NORSE_TWILIO_ACCOUNT_SID and _AUTH_TOKEN")
            if not (self.twilio_from or self.twilio_messaging_service_sid):
                raise ValueError("sms_gateway=twilio needs FHIR_NORSE_TWILIO_FROM or _MESSAGING_SERVICE_SID")
        if self.email_transport == "smtp" and not (self.smtp_host and self.smtp_from):
            raise ValueError("email_transport=smtp needs FHIR_NORSE_SMTP_HOST and FHIR_NORSE_SMTP_FROM")
        if self.mode == "production" and "log" in (self.sms_gateway, self.email_transport):
            raise ValueError("the 'log' message transport writes personal links to the log: development only")
        return self

    @model_validator(mode="after")
    def _refuse_weak_secrets(self) -> Settings:
        """Outside development mode, secrets must be set and must not be the published defaults."""
        if self.mode == "development":
            return self
        passphrase = self.key_passphrase.get_secret_value()
        if not passphrase:
            raise ValueError(
                "FHIR_NORSE_KEY_PASSPHRASE must be set in production (or set FHIR_NORSE_MODE=development)"
            )
        if passphrase in _KNOWN_DEFAULTS or len(passphrase) < 16:
            raise ValueError("FHIR_NORSE_KEY_PASSPHRASE is a default or shorter than 16 characters")
        return self


# Values published in this repository (documentation, development mode) that must never guard real keys.
_KNOWN_DEFAULTS = frozenset(
    {
        "changeme",
        "change-me",
        "secret",
        "password",
        "development",
        "fhir-norse-development-only-key-passphrase",
    }
)


def load_settings(**overrides: object) -> Settings:
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean)  # type: ignore[arg-type]
