"""The composition root: settings in, the whole server built once (nothing is changed afterwards).

Storage on the configured database, the SearchParameter registry and index extraction, the access
policy, the audit event builder, the content pack's profiles, and the outcome-monitoring layer: the
storage hooks of QuestionnaireResponse (intake and scoring) and ServiceRequest (clinician overrides),
and the operations it runs (``$extract`` always, the adaptive ones where an instrument adapts). The API
(:mod:`fhir_norse.api.app`) and the commands (:mod:`fhir_norse.cli`) both start here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from fhir_norse.auth.audit import AuditRecorder
from fhir_norse.auth.caller import Caller
from fhir_norse.auth.keys import passphrase_from
from fhir_norse.auth.links import PersonalLinks
from fhir_norse.auth.policy import AccessPolicy
from fhir_norse.auth.sealed import Sealer
from fhir_norse.config import Settings
from fhir_norse.instruments.registry import InstrumentRegistry
from fhir_norse.messaging.base import Transport
from fhir_norse.messaging.templates import MessageTemplates
from fhir_norse.outcomes import FhirError
from fhir_norse.rom.adaptive import AdaptiveOperations
from fhir_norse.rom.administrations import Administrations
from fhir_norse.rom.demo import DemoError, load_demo, site_root
from fhir_norse.rom.intake import QuestionnaireResponseIntake
from fhir_norse.rom.invitations import Dispatcher, Invitations
from fhir_norse.rom.operations import adaptive_state, extract, next_question, populate, tailored_form
from fhir_norse.rom.overrides import ScaleOverrideHook
from fhir_norse.rom.patient import AdaptiveService
from fhir_norse.rom.scheduler import Scheduler
from fhir_norse.server.bulk import BulkExportConfig
from fhir_norse.server.bulk import operations as bulk_export
from fhir_norse.server.bulk.worker import BulkExportWorker
from fhir_norse.server.content import search_registry
from fhir_norse.server.context import RequestContext
from fhir_norse.server.hooks import merge_hooks
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.operations.everything import EVERYTHING
from fhir_norse.server.operations.registry import Operation, OperationRegistry
from fhir_norse.server.operations.validate import VALIDATE
from fhir_norse.server.profiles import ProfileValidator
from fhir_norse.server.repository import Kernel, StorageHook
from fhir_norse.server.search.extract import default_extractor
from fhir_norse.server.search.known_shape import extractor_for
from fhir_norse.server.search.typed import Where
from fhir_norse.server.subscriptions import subscription_hooks
from fhir_norse.server.subscriptions.delivery import SubscriptionDelivery
from fhir_norse.server.subscriptions.hooks import SubscriptionHook
from fhir_norse.server.subscriptions.operations import EVENTS as SUBSCRIPTION_EVENTS
from fhir_norse.server.subscriptions.operations import STATUS as SUBSCRIPTION_STATUS
from fhir_norse.server.subscriptions.topics import load_topics
from fhir_norse.server.validation import preload as preload_validation
from fhir_norse.store.db import create_engine
from fhir_norse.store.maintenance import StatisticsKeeper
from fhir_norse.store.search.advertised import parse_extra
from fhir_norse.store.search.params import default_registry
from fhir_norse.store.search.request import SearchLimits
from fhir_norse.store.storage import Storage

SERVER_NAME = "fhir-norse"

log = logging.getLogger(__name__)


def build_service(settings: Settings) -> FhirService:
    """The server for ``settings``: one engine, one kernel, the hooks and the operations."""
    engine = create_engine(
        settings.database_url,
        synchronous=settings.sqlite_synchronous,
        busy_timeout_ms=settings.sqlite_busy_timeout_ms,
        pool_size=settings.db_pool_size,
    )
    if settings.db_statistics_interval_s > 0:
        # PostgreSQL only; a daemon thread that ends with the engine (store/maintenance.py).
        StatisticsKeeper(engine, settings.db_statistics_interval_s).start()
    # The advertised R4 search parameters, the content pack's (Flag?status=...) and the site's extra ones.
    registry = search_registry(settings.content_dir, parse_extra(settings.search_extra_parameters))
    extractor = extractor_for(registry)
    # Compile every FHIRPath expression and load the definitions now, not on a patient's first write.
    extractor.prepare()
    preload_validation()
    instruments = InstrumentRegistry.from_content_dir(settings.content_dir)
    adaptive = AdaptiveService(instruments)
    intake = QuestionnaireResponseIntake(instruments, adaptive)
    rom_hooks: dict[str, StorageHook] = {
        "QuestionnaireResponse": intake,
        "ServiceRequest": ScaleOverrideHook(instruments),
    }
    # Topic-based Subscriptions (Subscriptions R5 Backport): the Subscription hook and the outbox on the
    # types the content pack's topics trigger on (DiagnosticReport, Flag, Task), after the domain's own.
    subscriptions = subscription_hooks(
        settings.content_dir, Sealer(passphrase_from(settings)), allow_http=settings.subscription_allow_http
    )
    hooks = merge_hooks(rom_hooks, subscriptions.by_type())
    operations: list[Operation] = [
        VALIDATE,
        EVERYTHING,
        extract.operation(intake),
        SUBSCRIPTION_STATUS,
        SUBSCRIPTION_EVENTS,
        *bulk_export.operations(),
    ]
    if adaptive.adaptive_mappings():
        ops = AdaptiveOperations(adaptive, intake)
        operations += [
            next_question.operation(ops),
            populate.operation(ops),
            tailored_form.operation(ops),
            adaptive_state.operation(ops),
        ]
    kernel = Kernel(
        storage=Storage(engine),
        registry=registry,
        extractor=extractor,
        policy=AccessPolicy(),
        audit=AuditRecorder(server_name=SERVER_NAME, server_address=settings.base_url),
        hooks=hooks,
        profiles=ProfileValidator.from_content_dir(settings.content_dir),
        max_resource_bytes=settings.max_body_bytes,
        default_count=settings.default_count,
        max_count=settings.max_count,
        search_limits=SearchLimits(
            max_parameters=settings.search_max_parameters,
            max_values=settings.search_max_values,
            timeout_seconds=settings.search_timeout_seconds,
        ),
    )
    return FhirService(kernel, OperationRegistry(operations))


def build_bulk_export(settings: Settings, service: FhirService) -> BulkExportWorker:
    """The Bulk Data export worker of ``service`` (started by the app; ``bulk_export_interval_s`` 0: not)."""
    config = BulkExportConfig(
        directory=settings.bulk_export_dir,
        file_hours=settings.bulk_file_hours,
        file_lines=settings.bulk_file_lines,
        interval_s=settings.bulk_export_interval_s,
    )
    return BulkExportWorker(service, config, grace_s=settings.bulk_snapshot_grace_s)


def build_delivery(settings: Settings, service: FhirService) -> SubscriptionDelivery:
    """The Subscription delivery worker over ``service`` (not started: the app starts it)."""
    hook = SubscriptionHook(load_topics(settings.content_dir), Sealer(passphrase_from(settings)))
    return SubscriptionDelivery(
        service,
        hook,
        base_url=settings.fhir_base_url(),
        interval_s=settings.subscription_interval_s,
        retry_base_s=settings.subscription_retry_base_s,
        retry_max_s=settings.subscription_retry_max_s,
        max_failures=settings.subscription_max_failures,
        timeout_s=settings.subscription_timeout_s,
    )


def build_reader(database_url: str, *, pool_size: int = 1) -> FhirService:
    """The generic server on ``database_url`` without the outcome-monitoring layer: what a command that
    only reads stored resources (``fhir-norse calibrate``) goes through, so its reads pass the same
    repository (and leave the same audit trail) as any other."""
    extractor = default_extractor()
    kernel = Kernel(
        storage=Storage(create_engine(database_url, pool_size=pool_size)),
        registry=default_registry(),
        extractor=extractor,
        policy=AccessPolicy(),
        audit=AuditRecorder(server_name=SERVER_NAME),
    )
    return FhirService(kernel, OperationRegistry([VALIDATE, EVERYTHING]))


def event_recorder(service: FhirService, settings: Settings) -> AuditRecorder:
    """The recorder of events outside a FHIR interaction (token grants), each stored durably in a
    transaction of its own."""
    return AuditRecorder(service.record_now, server_name=SERVER_NAME, server_address=settings.base_url)


# ---------------------------------------------------------------------- the patient's way in (issue 15)


@dataclass(frozen=True)
class Journey:
    """What the patient's way in runs on: personal links, the Task lifecycle, message templates and
    transports (by channel: "sms", "email"; a channel switched off is absent), the dispatcher and the
    scheduler (not started: the app starts it)."""

    links: PersonalLinks
    administrations: Administrations
    templates: MessageTemplates
    transports: Mapping[str, Transport]
    dispatcher: Dispatcher
    scheduler: Scheduler

    def send_code(self, patient_id: str, code: str) -> None:
        """The "sms-code" second step's text message (:meth:`Dispatcher.send_code`)."""
        self.dispatcher.send_code(patient_id, code)

    def close(self) -> None:
        """Stop the scheduler and close the transports that hold connections."""
        self.scheduler.stop()
        for transport in self.transports.values():
            close = getattr(transport, "close", None)
            if callable(close):
                close()


def message_transports(settings: Settings) -> dict[str, Transport]:
    """The transports ``settings`` choose, by channel ("off": none for that channel)."""
    from fhir_norse.messaging.logsink import LogTransport
    from fhir_norse.messaging.smtp import SmtpEmail
    from fhir_norse.messaging.twilio import TwilioSms

    out: dict[str, Transport] = {}
    sms = settings.sms_transport()
    if sms == "twilio":
        out["sms"] = TwilioSms(
            str(settings.twilio_account_sid),
            settings.twilio_auth_token.get_secret_value(),
            sender=settings.twilio_from,
            messaging_service_sid=settings.twilio_messaging_service_sid,
            api_base=settings.twilio_api_base,
        )
    elif sms == "log":
        out["sms"] = LogTransport("sms")
    mail = settings.mail_transport()
    if mail == "smtp":
        out["email"] = SmtpEmail(
            str(settings.smtp_host),
            settings.smtp_port,
            str(settings.smtp_from),
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() or None,
            starttls=settings.smtp_starttls,
            ca_file=settings.smtp_ca_file,
        )
    elif mail == "log":
        out["email"] = LogTransport("email")
    return out


def build_journey(
    settings: Settings,
    service: FhirService,
    *,
    transports: Mapping[str, Transport] | None = None,
    now: Callable[[], datetime] | None = None,
) -> Journey:
    """The patient's way in over ``service`` (``transports``/``now``: tests replace the gateways and
    the clock)."""
    clock: Callable[[], datetime] = now or (lambda: datetime.now(UTC))
    links = PersonalLinks(service.storage.engine, session_minutes=settings.link_session_minutes, now=clock)
    administrations = Administrations(links, now=clock)
    templates = MessageTemplates(settings.message_templates_dir, timezone=settings.messaging_timezone)
    chosen = dict(message_transports(settings) if transports is None else transports)
    dispatcher = Dispatcher(
        service,
        links=links,
        templates=templates,
        transports=chosen,
        settings=settings,
        administrations=administrations,
        now=clock,
    )
    invitations = Invitations(
        channels=chosen.keys(),
        reminder_after_hours=settings.reminder_after_hours,
        administrations=administrations,
    )
    scheduler = Scheduler(
        service,
        administrations=administrations,
        invitations=invitations,
        dispatcher=dispatcher,
        timezone=settings.messaging_timezone,
        clinic_name=settings.clinic_name,
        interval_s=settings.scheduler_interval_s,
        now=clock,
    )
    return Journey(links, administrations, templates, chosen, dispatcher, scheduler)


# ---------------------------------------------------------------------- the demo clinic (issue 17)


def load_demo_if_empty(settings: Settings, service: FhirService) -> bool:
    """Load the demo clinic (:mod:`fhir_norse.rom.demo`) when ``settings.demo_on_empty`` is set, the mode
    is development and the database holds no Patient; whether it was loaded. Call it where the content
    pack was just published, once per database: in the process that starts the server, not in each
    worker. A failure of the demo is logged, not raised: the server starts all the same, and
    ``fhir-norse demo`` finishes the load."""
    if not settings.demo_on_empty or settings.mode != "development":
        return False
    ctx = RequestContext(caller=Caller.operator(), base_url=settings.fhir_base_url())
    with service.session(ctx, read_only=True) as repo:
        if repo.find(Where("Patient"), 1):
            return False
    log.info("the database holds no Patient: loading the demo clinic (FHIR_NORSE_DEMO_ON_EMPTY)")
    try:
        result = load_demo(service, base_url=settings.fhir_base_url(), timezone=settings.messaging_timezone)
    except (DemoError, FhirError) as error:
        log.error("the demo clinic was not loaded: %s; run `fhir-norse demo` to load it", error)
        return False
    for line in result.describe(site_root(settings.fhir_base_url())):
        log.info("%s", line)
    return True
