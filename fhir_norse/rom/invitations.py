"""Invitations and reminders: ``CommunicationRequest`` -> ``Communication``, one per sending attempt.

https://hl7.org/fhir/R4/communicationrequest.html, https://hl7.org/fhir/R4/communication.html.

**Requests** (:class:`Invitations`). For each open questionnaire Task whose owner is its Patient (made by
the scheduler, by ``fhir-norse invite``, or by an EHR over FHIR), once its window has opened: one
CommunicationRequest ``status`` active, ``subject`` and ``recipient`` the patient, ``about`` the Task,
``category`` notification (``communication-category``), ``medium`` SMSWRIT or EMAILWRIT
(``v3-ParticipationMode``), ``occurrenceDateTime`` when due, and a ``payload`` that says only which kind
of message it is ("invitation"): never clinical text, never the link. If the Task is still open
``reminder_after_hours`` after the invitation went out, one more (``category`` reminder). Ids are
computed from the Task's id, so a crash or a second worker never makes two.

**Channel.** ``Patient.telecom``: ``phone`` with ``use`` mobile (or ``sms``) for SMS, ``email`` for e-mail,
lowest ``rank`` first; a contact point whose ``period`` has ended is not used. The patient declines a
channel with the extension ``messaging-opt-out`` (:data:`~fhir_norse.canonicals.EXT_MESSAGING_OPT_OUT`,
``valueCode`` sms | email | all); an SMS gateway's "unsubscribed" answer (Twilio 21610) adds it.
**Language**: ``Patient.communication`` (the preferred one first) -> "nb" or "en"; default "nb".

**Sending** (:class:`Dispatcher`): never inside ``messaging_quiet_hours`` (the message waits for their
end). Each attempt is one Communication (``basedOn`` the request, ``about`` the Task, ``medium``,
``sent``, ``identifier`` the provider's message id under ``<MESSAGE_ID_SYSTEM>/<provider>``): status
``preparation`` while with the gateway, ``in-progress`` once accepted, ``completed`` when a delivery
report says delivered, ``not-done`` with ``statusReason`` when it failed. Every message carries a fresh
personal link (:class:`~fhir_norse.auth.links.PersonalLinks`); the raw link is never stored.

**Nothing sent twice after a crash.** The attempt is recorded as ``sending`` (table ``message_attempt``)
and committed *before* the gateway is called; the receipt is recorded after. An attempt still ``sending``
a while later (the process died in between) is never sent again: its Communication becomes ``unknown``
with a note, and a delivery report arriving later (the Communication id is in its callback URL) settles
it. Gateway errors that may pass are retried after ``message_retry_base_s * 2**n`` seconds (or the
provider's Retry-After if longer), at most ``message_max_attempts`` times; then the request is revoked
with a ``statusReason``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import TYPE_CHECKING, Any, Literal, cast
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from fhir_norse.auth.caller import Caller
from fhir_norse.canonicals import EXT_MESSAGING_OPT_OUT, MESSAGE_ID_SYSTEM
from fhir_norse.messaging.base import (
    OUTCOME_UNKNOWN,
    Channel,
    DeliveryReport,
    OutgoingMessage,
    SendError,
    SendReceipt,
    Transport,
)
from fhir_norse.rom.administrations import (
    Administrations,
    fhir_instant,
    is_questionnaire_task,
    task_owner_is_patient,
    task_patient,
    task_window,
)
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.repository import JsonDict, Repository, loads
from fhir_norse.server.resources import reference_id
from fhir_norse.store.scheduling_tables import MESSAGE_ATTEMPT, MESSAGE_DISPATCH

if TYPE_CHECKING:
    from fhir_norse.auth.links import PersonalLinks
    from fhir_norse.config import Settings
    from fhir_norse.messaging.templates import MessageTemplates

log = logging.getLogger(__name__)

PARTICIPATION_MODE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode"
COMMUNICATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/communication-category"
MEDIUM: Mapping[str, str] = {"sms": "SMSWRIT", "email": "EMAILWRIT"}
_CHANNEL_OF_MEDIUM = {code: channel for channel, code in MEDIUM.items()}
Kind = Literal["invitation", "reminder"]
_CATEGORY: Mapping[str, str] = {"invitation": "notification", "reminder": "reminder"}
# Twilio's "the recipient has unsubscribed" (STOP), in a delivery report.
TWILIO_UNSUBSCRIBED = "21610"
# The server acting on its own when it sends messages and records their fate (audited as this client).
MESSAGING_CALLER = Caller(
    client_id="fhir-norse-messaging", scopes=frozenset({"system/*.cruds"}), source="local"
)
_NAMESPACE = uuid.UUID("0b7d5c3e-2a41-5f0e-8d6b-93c1e4a7f215")
_NB = frozenset({"nb", "no", "nn", "nob", "nno", "nor"})


def _now() -> datetime:
    return datetime.now(UTC)


def _db(moment: datetime) -> datetime:
    """An aware moment as the naive UTC the tables hold."""
    return moment.astimezone(UTC).replace(tzinfo=None)


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC)


def request_id(task_id: str, kind: Kind) -> str:
    """The id of the CommunicationRequest of ``kind`` for Task ``task_id`` (one of each per Task)."""
    return str(uuid.uuid5(_NAMESPACE, f"Task/{task_id}#{kind}"))


def communication_id(request: str, attempt: int) -> str:
    """The id of the Communication of attempt ``attempt`` (1, 2, ...) of CommunicationRequest ``request``."""
    return str(uuid.uuid5(_NAMESPACE, f"CommunicationRequest/{request}#attempt-{attempt}"))


# ---------------------------------------------------------------------- the patient's channel and language


def declined_channels(patient: Mapping[str, Any]) -> frozenset[str]:
    """The channels the patient declined (``messaging-opt-out``): sms, email, or both for "all"."""
    out: set[str] = set()
    for ext in patient.get("extension") or []:
        if ext.get("url") == EXT_MESSAGING_OPT_OUT:
            code = ext.get("valueCode")
            out |= {"sms", "email"} if code == "all" else {str(code)}
    return frozenset(out)


def contact_points(patient: Mapping[str, Any], now: datetime) -> list[tuple[Channel, str]]:
    """(channel, address) of the patient's active contact points a message can go to, lowest rank
    first (in their order where ranks are equal)."""
    found: list[tuple[int, int, Channel, str]] = []
    for n, telecom in enumerate(patient.get("telecom") or []):
        value = telecom.get("value")
        if not isinstance(value, str) or not value.strip():
            continue
        end = _parse((telecom.get("period") or {}).get("end"))
        if end is not None and end <= now:
            continue
        system, use = telecom.get("system"), telecom.get("use")
        channel: Channel | None = None
        if system == "sms" or (system == "phone" and use == "mobile"):
            channel = "sms"
        elif system == "email":
            channel = "email"
        if channel is None:
            continue
        rank = telecom.get("rank")
        found.append((rank if isinstance(rank, int) else 2**31, n, channel, value.strip()))
    return [(channel, value) for _, _, channel, value in sorted(found)]


def choose_channel(
    patient: Mapping[str, Any],
    available: Collection[str],
    now: datetime,
    preferred: str | None = None,
) -> tuple[Channel, str] | None:
    """The (channel, address) a message to the patient goes to: among the ``available`` channels the
    patient has not declined, their lowest-ranked active contact point (of ``preferred`` only, if
    given); None when there is none."""
    declined = declined_channels(patient)
    for channel, address in contact_points(patient, now):
        if channel in available and channel not in declined and preferred in (None, channel):
            return channel, address
    return None


def patient_language(patient: Mapping[str, Any]) -> str:
    """ "nb" or "en" from ``Patient.communication`` (the preferred language first); "nb" by default."""
    entries = sorted(patient.get("communication") or [], key=lambda c: c.get("preferred") is not True)
    for entry in entries:
        for coding in (entry.get("language") or {}).get("coding") or []:
            code = str(coding.get("code") or "").lower().replace("_", "-").split("-")[0]
            if code == "en":
                return "en"
            if code in _NB:
                return "nb"
    return "nb"


class QuietHours:
    """``"21:00-08:00"`` in a time zone: no message goes out between the two (empty: none)."""

    def __init__(self, spec: str, timezone: str) -> None:
        self.zone = ZoneInfo(timezone)
        self.span: tuple[time, time] | None = None
        if spec.strip():
            start, sep, end = spec.partition("-")
            if not sep:
                raise ValueError(f"quiet hours {spec!r} must read HH:MM-HH:MM")
            self.span = (time.fromisoformat(start.strip()), time.fromisoformat(end.strip()))

    def until(self, now: datetime) -> datetime | None:
        """The end of the quiet period ``now`` falls in (aware UTC), or None when messages may go."""
        if self.span is None:
            return None
        start, end = self.span
        local = now.astimezone(self.zone)
        clock = local.time().replace(tzinfo=None)
        overnight = start > end
        quiet = (clock >= start or clock < end) if overnight else (start <= clock < end)
        if not quiet:
            return None
        day = local.date() + timedelta(days=1) if overnight and clock >= start else local.date()
        return datetime.combine(day, end, tzinfo=self.zone).astimezone(UTC)


def _parse(value: Any) -> datetime | None:
    from fhir_norse.rom.administrations import parse_instant

    return parse_instant(value)


def _coded(system: str, code: str) -> JsonDict:
    return {"coding": [{"system": system, "code": code}]}


def _request_channel(request: Mapping[str, Any]) -> Channel | None:
    for medium in request.get("medium") or []:
        for coding in medium.get("coding") or []:
            if coding.get("system") == PARTICIPATION_MODE and coding.get("code") in _CHANNEL_OF_MEDIUM:
                return cast(Channel, _CHANNEL_OF_MEDIUM[coding["code"]])
    return None


def _kind_of(request: Mapping[str, Any]) -> Kind:
    for category in request.get("category") or []:
        for coding in category.get("coding") or []:
            if coding.get("code") == "reminder":
                return "reminder"
    return "invitation"


def _strip_meta(body: Mapping[str, Any]) -> JsonDict:
    return {k: v for k, v in body.items() if k != "meta"}


# ---------------------------------------------------------------------- requests


class Invitations:
    """Creates the invitation and reminder CommunicationRequests of open questionnaire Tasks."""

    def __init__(
        self,
        *,
        channels: Collection[str],
        reminder_after_hours: float,
        administrations: Administrations,
    ) -> None:
        self.channels = frozenset(channels)
        self.reminder_after = timedelta(hours=reminder_after_hours) if reminder_after_hours > 0 else None
        self.administrations = administrations

    def wanted(self, repo: Repository, task: Mapping[str, Any], now: datetime) -> bool:
        """Whether :meth:`ensure` may have something to create for ``task`` (a cheap read first, so
        that a tick opens no write transaction for Tasks already invited)."""
        task_id = task.get("id")
        if not isinstance(task_id, str) or self.administrations.open_status(task, now) is not None:
            return False
        if repo.uow.current("CommunicationRequest", request_id(task_id, "invitation")) is None:
            return True
        if self.reminder_after is None or repo.uow.current(
            "CommunicationRequest", request_id(task_id, "reminder")
        ):
            return False
        sent_at = self._sent_at(repo, request_id(task_id, "invitation"))
        return sent_at is not None and now >= sent_at + self.reminder_after

    def ensure(
        self, repo: Repository, task: Mapping[str, Any], now: datetime, *, channel: str | None = None
    ) -> list[str]:
        """The CommunicationRequests ``task`` is due now (invitation, reminder) that did not exist, created
        in ``repo``'s transaction with their dispatch rows; returns their ids. ``channel`` restricts the
        invitation to one channel (``fhir-norse invite --channel``)."""
        task_id = task.get("id")
        patient_id = task_patient(task)
        if (
            not isinstance(task_id, str)
            or patient_id is None
            or not is_questionnaire_task(task)
            or not task_owner_is_patient(task)
            or self.administrations.open_status(task, now) is not None
        ):
            return []
        invitation_id = request_id(task_id, "invitation")
        reminder_id = request_id(task_id, "reminder")
        if not self.wanted(repo, task, now):
            return []
        # Check-then-create, serialised per Task: the ids alone would refuse a duplicate, but with a 500.
        repo.serialize(f"invitations:{task_id}")
        patient_stored = repo.get("Patient", patient_id)
        if patient_stored is None:
            return []
        patient = loads(patient_stored.body_text)
        invitation = repo.uow.current("CommunicationRequest", invitation_id)
        if invitation is None:
            chosen = choose_channel(patient, self.channels, now, channel)
            if chosen is None:
                log.info("Task/%s: the patient has no channel a message can go to", task_id)
                return []
            self._create(repo, invitation_id, "invitation", task, patient_id, chosen[0], now, now)
            return [invitation_id]
        if self.reminder_after is None or repo.uow.current("CommunicationRequest", reminder_id) is not None:
            return []
        sent_at = self._sent_at(repo, invitation_id)
        _, end = task_window(task)
        if sent_at is None or now < sent_at + self.reminder_after or (end is not None and now >= end):
            return []
        chosen = choose_channel(patient, self.channels, now, _request_channel(loads(invitation.body_text)))
        chosen = chosen or choose_channel(patient, self.channels, now)
        if chosen is None:
            return []
        self._create(repo, reminder_id, "reminder", task, patient_id, chosen[0], now, now)
        return [reminder_id]

    @staticmethod
    def _sent_at(repo: Repository, invitation_id: str) -> datetime | None:
        row = repo.uow.conn.execute(
            sa.select(MESSAGE_DISPATCH.c.state, MESSAGE_DISPATCH.c.due_at).where(
                MESSAGE_DISPATCH.c.request_id == invitation_id
            )
        ).first()
        # Once done, due_at is when the message went out.
        return _aware(row.due_at) if row is not None and row.state == "done" else None

    @staticmethod
    def _create(
        repo: Repository,
        res_id: str,
        kind: Kind,
        task: Mapping[str, Any],
        patient_id: str,
        channel: Channel,
        due: datetime,
        now: datetime,
    ) -> None:
        patient = {"reference": f"Patient/{patient_id}"}
        body: JsonDict = {
            "resourceType": "CommunicationRequest",
            "id": res_id,
            "status": "active",
            "category": [_coded(COMMUNICATION_CATEGORY, _CATEGORY[kind])],
            "medium": [_coded(PARTICIPATION_MODE, MEDIUM[channel])],
            "subject": patient,
            "about": [{"reference": f"Task/{task['id']}"}],
            # What the message is, never what it says: no clinical text, no link.
            "payload": [{"contentString": kind}],
            "occurrenceDateTime": fhir_instant(due),
            "authoredOn": fhir_instant(now),
            "recipient": [patient],
        }
        requester = task.get("requester")
        if isinstance(requester, Mapping) and requester.get("reference"):
            body["requester"] = dict(requester)
        repo.create("CommunicationRequest", body, res_id=res_id)
        repo.uow.conn.execute(
            sa.insert(MESSAGE_DISPATCH).values(
                request_id=res_id,
                task_id=str(task["id"]),
                patient_id=patient_id,
                kind=kind,
                state="pending",
                due_at=_db(due),
                attempts=0,
            )
        )


# ---------------------------------------------------------------------- sending


@dataclass(frozen=True, slots=True)
class DispatchResult:
    """What one dispatch of one request did."""

    request_id: str
    # sent | failed (will be retried) | deferred (quiet hours) | revoked | skipped (not due or taken)
    # | unknown (the gateway's answer was lost: maybe sent, never re-sent)
    outcome: str
    communication_id: str | None = None
    communication_status: str | None = None
    channel: str | None = None
    due_at: datetime | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class _Claim:
    request_id: str
    communication_id: str
    attempt: int
    kind: Kind
    task_id: str
    patient_id: str
    channel: Channel
    address: str
    language: str
    link_expires: datetime


class Dispatcher:
    """Sends due CommunicationRequests, records each attempt as a Communication, and takes delivery
    reports (module doc)."""

    def __init__(
        self,
        service: FhirService,
        *,
        links: PersonalLinks,
        templates: MessageTemplates,
        transports: Mapping[str, Transport],
        settings: Settings,
        administrations: Administrations,
        now: Callable[[], datetime] = _now,
        stale_after_s: float = 300.0,
    ) -> None:
        self.service = service
        self.links = links
        self.templates = templates
        self.transports = dict(transports)
        self.settings = settings
        self.administrations = administrations
        self.now = now
        self.quiet = QuietHours(settings.messaging_quiet_hours, settings.messaging_timezone)
        self.stale_after = timedelta(seconds=stale_after_s)
        self.ctx = RequestContext(caller=MESSAGING_CALLER, base_url=settings.fhir_base_url())

    @property
    def engine(self) -> sa.Engine:
        return self.service.storage.engine

    # ------------------------------------------------------------------ the loop
    def dispatch(
        self, now: datetime | None = None, *, request_ids: Sequence[str] | None = None
    ) -> list[DispatchResult]:
        """Send what is due at ``now`` (only ``request_ids`` if given), after settling attempts a crash
        left behind (:meth:`recover`)."""
        now = now or self.now()
        self.recover(now)
        if request_ids is None:
            with self.engine.connect() as conn:
                request_ids = list(
                    conn.execute(
                        sa.select(MESSAGE_DISPATCH.c.request_id)
                        .where(MESSAGE_DISPATCH.c.state == "pending", MESSAGE_DISPATCH.c.due_at <= _db(now))
                        .order_by(MESSAGE_DISPATCH.c.due_at)
                        .limit(500)
                    ).scalars()
                )
        results = []
        for rid in request_ids:
            try:
                results.append(self.send(rid, now))
            except Exception:
                log.exception("CommunicationRequest/%s: dispatch failed; the attempt stays recorded", rid)
                results.append(DispatchResult(rid, "error"))
        return results

    def send(self, rid: str, now: datetime) -> DispatchResult:
        """One attempt at CommunicationRequest ``rid`` if it is due at ``now``."""
        claimed = self._claim(rid, now)
        if isinstance(claimed, DispatchResult):
            return claimed
        try:
            message = self._message(claimed)
            transport = self.transports[claimed.channel]
        except Exception as error:  # nothing reached a gateway: an ordinary, retryable failure
            log.exception("CommunicationRequest/%s: the message could not be prepared", rid)
            return self._record_failure(
                claimed, SendError(f"not prepared: {type(error).__name__}", retryable=True), now
            )
        try:
            receipt = transport.send(message)
        except SendError as error:
            if error.code == OUTCOME_UNKNOWN:
                return self._record_unknown(claimed, error, now)
            return self._record_failure(claimed, error, now)
        return self._record_receipt(claimed, receipt, now)

    def _message(self, claim: _Claim) -> OutgoingMessage:
        token = self.links.issue(claim.task_id, claim.patient_id, claim.link_expires)
        link = f"{self.settings.patient_origin()}/p/{token}"
        rendered = self.templates.render(
            claim.kind,
            claim.channel,
            claim.language,
            clinic_name=self.settings.clinic_name,
            link=link,
            expires_at=claim.link_expires,
        )
        callback = None
        if claim.channel == "sms":
            callback = f"{self.settings.patient_origin()}/messaging/twilio/status/{claim.communication_id}"
        return OutgoingMessage(
            channel=claim.channel,
            to=claim.address,
            body=rendered.body,
            subject=rendered.subject,
            reference=claim.communication_id,
            status_callback=callback,
        )

    # ------------------------------------------------------------------ steps, each one transaction
    def _row(self, repo: Repository, rid: str) -> Any:
        return repo.uow.conn.execute(
            sa.select(MESSAGE_DISPATCH).where(MESSAGE_DISPATCH.c.request_id == rid)
        ).first()

    def _set_row(self, repo: Repository, rid: str, **values: Any) -> None:
        repo.uow.conn.execute(
            sa.update(MESSAGE_DISPATCH).where(MESSAGE_DISPATCH.c.request_id == rid).values(**values)
        )

    def _revoke(
        self, repo: Repository, rid: str, request: Mapping[str, Any] | None, reason: str
    ) -> DispatchResult:
        if request is not None and request.get("status") == "active":
            body = _strip_meta(request) | {"status": "revoked", "statusReason": {"text": reason}}
            repo.update("CommunicationRequest", rid, body)
        self._set_row(repo, rid, state="revoked")
        return DispatchResult(rid, "revoked", detail=reason)

    def _claim(self, rid: str, now: datetime) -> _Claim | DispatchResult:
        """Transaction A: check the request is still due and wanted, then record the attempt as
        ``sending`` with its Communication (``preparation``), committed before the gateway is called."""
        with self.service.session(self.ctx) as repo:
            repo.serialize(f"dispatch:{rid}")
            row = self._row(repo, rid)
            if row is None or row.state != "pending" or _aware(row.due_at) > now:
                return DispatchResult(rid, "skipped")
            stored = repo.get("CommunicationRequest", rid)
            request = loads(stored.body_text) if stored is not None else None
            if request is None or request.get("status") != "active":
                return self._revoke(repo, rid, None, "the request is no longer active")
            task_stored = repo.get("Task", row.task_id)
            task = loads(task_stored.body_text) if task_stored is not None else None
            why = "deleted" if task is None else self.administrations.open_status(task, now)
            if why is not None:
                return self._revoke(
                    repo, rid, request, f"the questionnaire can no longer be answered ({why})"
                )
            assert task is not None
            until = self.quiet.until(now)
            if until is not None:
                self._set_row(repo, rid, due_at=_db(until))
                return DispatchResult(rid, "deferred", due_at=until)
            patient_stored = repo.get("Patient", row.patient_id)
            patient = loads(patient_stored.body_text) if patient_stored is not None else {}
            channel = _request_channel(request)
            chosen = (
                choose_channel(patient, self.transports, now, channel) if channel in self.transports else None
            )
            if chosen is None:
                reason = (
                    f"the patient has no active {channel or 'message'} contact, or declined these messages"
                )
                return self._revoke(repo, rid, request, reason)
            attempt = int(row.attempts) + 1
            comm_id = communication_id(rid, attempt)
            kind = _kind_of(request)
            repo.create(
                "Communication",
                self._communication(comm_id, rid, request, task, chosen[0], kind),
                res_id=comm_id,
            )
            repo.uow.conn.execute(
                sa.insert(MESSAGE_ATTEMPT).values(
                    communication_id=comm_id,
                    request_id=rid,
                    attempt=attempt,
                    state="sending",
                    channel=chosen[0],
                    created_at=_db(now),
                    updated_at=_db(now),
                )
            )
            self._set_row(repo, rid, state="sending", attempts=attempt)
            _, end = task_window(task)
            expires = end or now + timedelta(hours=72)
            if self.settings.link_ttl_hours is not None:
                expires = now + timedelta(hours=self.settings.link_ttl_hours)
            return _Claim(
                rid,
                comm_id,
                attempt,
                kind,
                row.task_id,
                row.patient_id,
                chosen[0],
                chosen[1],
                patient_language(patient),
                expires,
            )

    @staticmethod
    def _communication(
        comm_id: str,
        rid: str,
        request: Mapping[str, Any],
        task: Mapping[str, Any],
        channel: Channel,
        kind: Kind,
    ) -> JsonDict:
        return {
            "resourceType": "Communication",
            "id": comm_id,
            "basedOn": [{"reference": f"CommunicationRequest/{rid}"}],
            "status": "preparation",
            "category": request.get("category") or [],
            "medium": [_coded(PARTICIPATION_MODE, MEDIUM[channel])],
            "subject": request.get("subject"),
            "about": [{"reference": f"Task/{task['id']}"}],
            "recipient": request.get("recipient") or [],
            # The kind of message only: the text held a personal link, which is never stored.
            "payload": [{"contentString": kind}],
        }

    def _record_receipt(self, claim: _Claim, receipt: SendReceipt, now: datetime) -> DispatchResult:
        """Transaction B: the gateway accepted the message."""
        with self.service.session(self.ctx) as repo:
            stored = repo.current_locked("Communication", claim.communication_id)
            comm = loads(stored.body_text) if stored is not None and not stored.deleted else None
            status = "in-progress"
            if comm is not None:
                # A delivery report may have come in first: it has the last word on the status.
                status = comm["status"] if comm.get("status") in ("completed", "not-done") else "in-progress"
                body = _strip_meta(comm) | {
                    "status": status,
                    "identifier": [
                        {"system": f"{MESSAGE_ID_SYSTEM}/{receipt.provider}", "value": receipt.message_id}
                    ],
                    "sent": fhir_instant(now),
                }
                repo.update("Communication", claim.communication_id, body)
            repo.uow.conn.execute(
                sa.update(MESSAGE_ATTEMPT)
                .where(MESSAGE_ATTEMPT.c.communication_id == claim.communication_id)
                .values(
                    state="sent",
                    provider=receipt.provider,
                    message_id=receipt.message_id,
                    updated_at=_db(now),
                )
            )
            self._set_row(repo, claim.request_id, state="done", due_at=_db(now))
            self._complete_request(repo, claim.request_id)
        return DispatchResult(claim.request_id, "sent", claim.communication_id, status, claim.channel)

    @staticmethod
    def _complete_request(repo: Repository, rid: str, note: str | None = None) -> None:
        stored = repo.get("CommunicationRequest", rid)
        if stored is None:
            return
        request = loads(stored.body_text)
        if request.get("status") != "active":
            return
        body = _strip_meta(request) | {"status": "completed"}
        if note:
            body["note"] = [*(request.get("note") or []), {"text": note}]
        repo.update("CommunicationRequest", rid, body)

    def _record_failure(self, claim: _Claim, error: SendError, now: datetime) -> DispatchResult:
        """Transaction B': the gateway refused the message, or it could not be prepared."""
        reason = f"{error.message}" + (f" (code {error.code})" if error.code else "")
        with self.service.session(self.ctx) as repo:
            stored = repo.current_locked("Communication", claim.communication_id)
            if stored is not None and not stored.deleted:
                comm = loads(stored.body_text)
                body = _strip_meta(comm) | {"status": "not-done", "statusReason": {"text": reason}}
                repo.update("Communication", claim.communication_id, body)
            repo.uow.conn.execute(
                sa.update(MESSAGE_ATTEMPT)
                .where(MESSAGE_ATTEMPT.c.communication_id == claim.communication_id)
                .values(state="failed", updated_at=_db(now))
            )
            request_stored = repo.get("CommunicationRequest", claim.request_id)
            request = loads(request_stored.body_text) if request_stored is not None else None
            if error.opted_out:
                record_opt_out(repo, claim.patient_id, claim.channel)
                result = self._revoke(
                    repo, claim.request_id, request, f"the patient opted out of {claim.channel} messages"
                )
                return DispatchResult(
                    claim.request_id,
                    "revoked",
                    claim.communication_id,
                    "not-done",
                    claim.channel,
                    detail=result.detail,
                )
            if error.retryable and claim.attempt < self.settings.message_max_attempts:
                delay = self.settings.message_retry_base_s * 2 ** (claim.attempt - 1)
                delay = max(delay, error.retry_after or 0.0)
                due = now + timedelta(seconds=delay)
                self._set_row(repo, claim.request_id, state="pending", due_at=_db(due))
                return DispatchResult(
                    claim.request_id, "failed", claim.communication_id, "not-done", claim.channel, due, reason
                )
            why = (
                f"not sent after {claim.attempt} attempts: {reason}"
                if error.retryable
                else f"the gateway refused the message: {reason}"
            )
            self._revoke(repo, claim.request_id, request, why)
        return DispatchResult(
            claim.request_id, "revoked", claim.communication_id, "not-done", claim.channel, detail=why
        )

    # ------------------------------------------------------------------ after a crash
    def recover(self, now: datetime | None = None) -> int:
        """Attempts left ``sending`` for longer than ``stale_after`` (the process died between handing
        the message to the gateway and recording the answer): never sent again; their Communication
        becomes ``unknown`` with a note, their request is done. Returns how many."""
        now = now or self.now()
        with self.engine.connect() as conn:
            stale = list(
                conn.execute(
                    sa.select(MESSAGE_ATTEMPT.c.communication_id, MESSAGE_ATTEMPT.c.request_id).where(
                        MESSAGE_ATTEMPT.c.state == "sending",
                        MESSAGE_ATTEMPT.c.created_at <= _db(now - self.stale_after),
                    )
                )
            )
        for comm_id, rid in stale:
            with self.service.session(self.ctx) as repo:
                repo.serialize(f"dispatch:{rid}")
                state = repo.uow.conn.execute(
                    sa.select(MESSAGE_ATTEMPT.c.state).where(MESSAGE_ATTEMPT.c.communication_id == comm_id)
                ).scalar_one_or_none()
                if state != "sending":
                    continue
                self._settle_unknown(
                    repo,
                    comm_id,
                    rid,
                    "The server stopped after handing this message to the gateway and before "
                    "recording the answer; it is not sent again. A delivery report settles it.",
                    now,
                )
        return len(stale)

    def _record_unknown(self, claim: _Claim, error: SendError, now: datetime) -> DispatchResult:
        """The gateway's answer was lost after the request went out (``outcome-unknown``): the message
        may have been sent, so it is not sent again; a delivery report settles it."""
        with self.service.session(self.ctx) as repo:
            self._settle_unknown(
                repo,
                claim.communication_id,
                claim.request_id,
                f"{error.message}; it is not sent again. A delivery report settles it.",
                now,
            )
        return DispatchResult(
            claim.request_id,
            "unknown",
            claim.communication_id,
            "unknown",
            claim.channel,
            detail=error.message,
        )

    def _settle_unknown(self, repo: Repository, comm_id: str, rid: str, note: str, now: datetime) -> None:
        """The attempt ``comm_id`` may or may not have reached the patient: its Communication becomes
        ``unknown`` with ``note``, and its request is done (never re-sent)."""
        stored = repo.current_locked("Communication", comm_id)
        if stored is not None and not stored.deleted:
            comm = loads(stored.body_text)
            if comm.get("status") == "preparation":
                body = _strip_meta(comm) | {
                    "status": "unknown",
                    "note": [*(comm.get("note") or []), {"text": note}],
                }
                repo.update("Communication", comm_id, body)
        repo.uow.conn.execute(
            sa.update(MESSAGE_ATTEMPT)
            .where(MESSAGE_ATTEMPT.c.communication_id == comm_id)
            .values(state="unknown", updated_at=_db(now))
        )
        self._set_row(repo, rid, state="done")
        self._complete_request(repo, rid, "delivery uncertain: see the Communication")

    # ------------------------------------------------------------------ delivery reports
    def send_code(self, patient_id: str, code: str) -> bool:
        """Text the one-time code of the link's second step ("sms-code") to the patient's mobile number,
        in their language. Sent at once (the patient is waiting; quiet hours do not apply), never
        recorded with the code. False when no SMS can reach the patient (no gateway, no active mobile
        number, opted out) or the gateway refused it."""
        transport = self.transports.get("sms")
        if transport is None:
            return False
        now = self.now()
        with self.service.session(self.ctx, read_only=True) as repo:
            stored = repo.get("Patient", patient_id)
            patient = loads(stored.body_text) if stored is not None and not stored.deleted else None
        target = choose_channel(patient, ("sms",), now) if patient is not None else None
        if patient is None or target is None:
            return False
        rendered = self.templates.render(
            "code", "sms", patient_language(patient), clinic_name=self.settings.clinic_name, code=code
        )
        try:
            transport.send(OutgoingMessage(channel="sms", to=target[1], body=rendered.body, reference="code"))
        except SendError as error:
            log.warning("one-time code to Patient/%s not sent: %s", patient_id, error.message)
            return False
        return True

    def record_delivery(self, comm_id: str, report: DeliveryReport, now: datetime | None = None) -> bool:
        """A provider's delivery report on the Communication ``comm_id``: delivered -> completed (with
        ``received``), failed/undelivered -> not-done with ``statusReason``; a report still on its way
        settles an ``unknown`` or ``preparation`` one as ``in-progress``. Idempotent. False when no
        such Communication exists."""
        now = now or self.now()
        with self.service.session(self.ctx) as repo:
            stored = repo.current_locked("Communication", comm_id)
            if stored is None or stored.deleted:
                return False
            comm = loads(stored.body_text)
            status = comm.get("status")
            body = _strip_meta(comm)
            if not body.get("identifier"):
                body["identifier"] = [{"system": f"{MESSAGE_ID_SYSTEM}/twilio", "value": report.message_id}]
            if report.delivered is True and status != "completed":
                body |= {"status": "completed", "received": fhir_instant(now)}
                body.pop("statusReason", None)
            elif report.delivered is False and status not in ("not-done", "completed"):
                text = f"the gateway reported the message {report.status}"
                if report.error_code:
                    text += f" (error {report.error_code})"
                body |= {"status": "not-done", "statusReason": {"text": text}}
                if report.error_code == TWILIO_UNSUBSCRIBED:
                    patient = reference_id((comm.get("subject") or {}).get("reference"), "Patient")
                    if patient is not None:
                        record_opt_out(repo, patient, "sms")
            elif report.delivered is None and status in ("preparation", "unknown"):
                body["status"] = "in-progress"
            else:
                return True
            repo.update("Communication", comm_id, body)
            repo.uow.conn.execute(
                sa.update(MESSAGE_ATTEMPT)
                .where(
                    MESSAGE_ATTEMPT.c.communication_id == comm_id,
                    MESSAGE_ATTEMPT.c.state.in_(("sending", "unknown")),
                )
                .values(state="settled", updated_at=_db(now))
            )
        return True


def record_opt_out(repo: Repository, patient_id: str, channel: str) -> None:
    """Add ``channel`` to the channels Patient ``patient_id`` declined (``messaging-opt-out``)."""
    stored = repo.current_locked("Patient", patient_id)
    if stored is None or stored.deleted:
        return
    patient = loads(stored.body_text)
    declined = declined_channels(patient)
    if channel in declined:
        return
    code = "all" if declined | {channel} >= {"sms", "email"} else channel
    others = [e for e in patient.get("extension") or [] if e.get("url") != EXT_MESSAGING_OPT_OUT]
    body = _strip_meta(patient) | {"extension": [*others, {"url": EXT_MESSAGING_OPT_OUT, "valueCode": code}]}
    repo.update("Patient", patient_id, body)
