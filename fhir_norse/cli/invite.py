"""``fhir-norse invite``: ask a patient to answer a questionnaire now, with a personal link by SMS or e-mail.

Creates the SDC questionnaire Task (open from now for ``--hours``), its invitation (a
CommunicationRequest) and sends it at once, as the scheduler would for a Task an EHR creates over FHIR
(:mod:`fhir_norse.rom.scheduler`); outside the configured quiet hours only: inside them it says when
the message will go, and the server's scheduler sends it then. Prints the Task, the channel and the
Communication's status.

``--questionnaire``: ``nf21`` (the adaptive bokmål NF form), ``phq9``, ``gad7``, or a canonical
(``url`` or ``url|version``); a bare name or url takes the newest version published on the server.

Exit codes: 0 sent (or waiting for the end of quiet hours), 1 not sent (no channel, the gateway
refused), 2 bad arguments or settings (unknown patient or questionnaire).
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

__all__ = ["COMMANDS", "SHORT_NAMES", "register_commands", "run_command"]

COMMANDS = frozenset({"invite"})
# Short names of the forms the content pack publishes (fhir_norse.canonicals.questionnaire ids).
SHORT_NAMES = {"nf21": "nf21-adaptive", "phq9": "phq9", "gad7": "gad7"}


class InviteError(Exception):
    """A refusal the command explains (exit code ``code``)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def register_commands(subparsers: Any) -> None:
    """Add ``invite`` to the ``fhir-norse`` subcommands (dest ``command``)."""
    parser = subparsers.add_parser(
        "invite",
        help="send a patient a personal link to answer a questionnaire now",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--database-url", help="SQLAlchemy URL (env FHIR_NORSE_DATABASE_URL)")
    parser.add_argument("--patient", required=True, help="the Patient's id on this server")
    parser.add_argument(
        "--questionnaire",
        required=True,
        help="nf21 | phq9 | gad7 | a Questionnaire canonical (url[|version])",
    )
    parser.add_argument(
        "--hours", type=float, default=72.0, help="how long the link can be answered (default 72)"
    )
    parser.add_argument(
        "--channel", choices=("sms", "email"), help="the channel (default: the patient's first)"
    )


def resolve_questionnaire(repo: Any, name: str) -> str:
    """``url|version`` of the stored Questionnaire ``name`` stands for (module doc)."""
    from fhir_norse.canonicals import questionnaire
    from fhir_norse.instruments.registry import version_key
    from fhir_norse.server.repository import loads
    from fhir_norse.server.search.typed import Where

    url, _, version = (questionnaire(SHORT_NAMES[name]) if name in SHORT_NAMES else name).partition("|")
    found = [loads(s.body_text) for s in repo.find(Where("Questionnaire", uris={"url": url}), 1000)]
    versions = [str(q.get("version")) for q in found if q.get("version")]
    if version:
        if version not in versions:
            raise InviteError(f"Questionnaire {url}|{version} is not published on this server")
        return f"{url}|{version}"
    if not versions:
        raise InviteError(f"Questionnaire {url} is not published on this server")
    return f"{url}|{max(versions, key=version_key)}"


def invite(
    service: Any,
    journey: Any,
    settings: Any,
    *,
    patient_id: str,
    questionnaire: str,
    hours: float,
    channel: str | None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Create the Task and its invitation, and send it now: what was done, for printing."""
    from fhir_norse.auth.caller import Caller
    from fhir_norse.rom.administrations import questionnaire_task
    from fhir_norse.rom.invitations import choose_channel
    from fhir_norse.server.context import RequestContext
    from fhir_norse.server.repository import loads
    from fhir_norse.server.resources import new_id

    if hours <= 0:
        raise InviteError("--hours must be positive")
    now = now or datetime.now(UTC)
    ctx = RequestContext(caller=Caller.operator(), base_url=settings.fhir_base_url())
    invitations = journey.scheduler.invitations
    with service.session(ctx) as repo:
        stored = repo.get("Patient", patient_id)
        if stored is None:
            raise InviteError(f"Patient/{patient_id} is not known")
        chosen = choose_channel(loads(stored.body_text), invitations.channels, now, channel)
        if chosen is None:
            wanted = f"active {channel} contact" if channel else "active mobile number or e-mail address"
            raise InviteError(
                f"Patient/{patient_id} has no {wanted} that messages are sent to (or declined them); "
                f"channels in use here: {', '.join(sorted(invitations.channels)) or 'none'}",
                code=1,
            )
        canonical = resolve_questionnaire(repo, questionnaire)
        task_id = new_id()
        task = questionnaire_task(
            task_id=task_id,
            patient_id=patient_id,
            questionnaire=canonical,
            start=now,
            end=now + timedelta(hours=hours),
            authored=now,
            requester={"display": settings.clinic_name},
        )
        repo.create("Task", task, res_id=task_id)
        requests = invitations.ensure(repo, task, now, channel=chosen[0])
    results = journey.dispatcher.dispatch(now, request_ids=requests)
    return {"task": task_id, "questionnaire": canonical, "channel": chosen[0], "results": results}


def run_command(args: argparse.Namespace, settings: Any) -> int:
    """Run ``invite``; the exit code."""
    from fhir_norse.compose import build_journey, build_service

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    service = build_service(settings)
    try:
        journey = build_journey(settings, service)
        done = invite(
            service,
            journey,
            settings,
            patient_id=args.patient,
            questionnaire=args.questionnaire,
            hours=args.hours,
            channel=args.channel,
        )
    except InviteError as error:
        print(f"fhir-norse invite: {error}", file=sys.stderr)
        return error.code
    finally:
        service.storage.engine.dispose()
    print(f"Task/{done['task']} ({done['questionnaire']})")
    print(f"channel: {done['channel']}")
    code = 0
    for result in done["results"]:
        if result.outcome == "deferred" and result.due_at is not None:
            local = result.due_at.astimezone(ZoneInfo(settings.messaging_timezone))
            when = f"{local:%Y-%m-%d %H:%M} ({settings.messaging_timezone})"
            print(f"quiet hours: the invitation will be sent at {when}")
        elif result.communication_id is not None:
            print(f"Communication/{result.communication_id}: {result.communication_status}")
            if result.outcome == "failed" and result.due_at is not None:
                print(
                    f"not sent: {result.detail}; the server tries again after {result.due_at:%H:%M} UTC",
                    file=sys.stderr,
                )
                code = 1
            elif result.outcome != "sent":
                print(f"not sent: {result.detail}", file=sys.stderr)
                code = 1
        else:
            print(f"not sent: {result.detail or result.outcome}", file=sys.stderr)
            code = 1
    return code
