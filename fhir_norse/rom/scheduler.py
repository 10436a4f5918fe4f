"""The scheduler: monitoring plans -> questionnaire Tasks -> invitations -> messages, inside the server.

**The monitoring plan** is a ``CarePlan`` (https://hl7.org/fhir/R4/careplan.html; ``status`` active,
``intent`` plan, ``subject`` the Patient, the EpisodeOfCare in the project's ``workflow-episodeOfCare``
extension) whose ``activity.detail`` has ``kind`` Task, ``instantiatesCanonical`` the Questionnaire,
``code`` the administration context (intake | weekly | termination, CodeSystem
``administration-context``) and either

* ``scheduledTiming`` (``Timing.repeat``): ``dayOfWeek`` + ``timeOfDay`` with ``period``/``periodUnit``
  (``wk``: every ``period`` weeks on those days; ``d``: every ``period`` days), e.g. every Monday
  08:00, read in ``settings.messaging_timezone``; ``boundsPeriod`` limits it. One Task per occurrence,
  open from the occurrence for the activity's answer window: the extension
  :data:`~fhir_norse.canonicals.EXT_ANSWER_WINDOW` (``valueDuration``, default 72 h); or
* the extension :data:`~fhir_norse.canonicals.EXT_BEFORE_APPOINTMENT` (``valueDuration``, e.g. 48 h):
  one Task per booked ``Appointment`` of the patient (https://hl7.org/fhir/R4/appointment.html;
  ``participant.actor`` the Patient, whose participant ``status`` is not declined), open from that long
  before ``Appointment.start`` until it starts; the Task's ``reasonReference`` is the Appointment. Only
  ``status`` booked counts: ``proposed``, ``pending`` and ``waitlist`` are not yet agreed with every
  participant, and ``arrived``, ``checked-in`` and ``fulfilled`` are reached at the start, when the
  window has closed anyway. An Appointment that is cancelled, a no-show, entered in error, deleted or
  declined by the patient cancels its open Task; one moved to another ``start`` cancels the Task of the
  old time, and the new time gets a Task of its own (its window opens before the new start).

The same plan may come as a ``ServiceRequest`` with ``intent`` plan (what an EHR without CarePlan
sends): ``instantiatesCanonical`` the Questionnaire, ``code`` the context, ``occurrenceTiming`` the
timing, and the same extensions on the resource itself. The plan's ``period`` (CarePlan; else
``created``) / ``authoredOn`` (ServiceRequest) bound the occurrences, and the Appointments' starts, from
below (a new plan makes no Tasks for the past) and ``period.end`` from above.

**A tick** (:meth:`Scheduler.tick`), in order: create the due Tasks of active plans (ids computed from
plan, activity and occurrence, created check-then-create under a lock on that id, so a crash or a second
worker never makes two); fail open Tasks whose window has passed and revoke their links; cancel open
Tasks of plans ended (completed, revoked, entered-in-error) or deleted, and of Appointments cancelled
or moved (above), and revoke their links; create invitations and
reminders (:class:`~fhir_norse.rom.invitations.Invitations`); send what is due
(:class:`~fhir_norse.rom.invitations.Dispatcher`); then the extra periodic work registered with
:meth:`Scheduler.add_job` (the feedback report's PDF documents), each job on its own, a failure logged.
Only one worker ticks at a time: a lease row
(``scheduler_lease``) taken with ``UPDATE ... WHERE expires_at < now OR holder = me``. All state is in
the database; every write goes through the repository as the client ``fhir-norse-scheduler`` and is
audited.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from fhir_norse.adaptive.history import CS_CONTEXT, EPISODE_EXTENSION
from fhir_norse.auth.caller import Caller
from fhir_norse.canonicals import EXT_ANSWER_WINDOW, EXT_BEFORE_APPOINTMENT
from fhir_norse.outcomes import FhirError
from fhir_norse.rom.administrations import (
    APPOINTMENT_CANCELLED,
    APPOINTMENT_MOVED,
    OPEN_STATUSES,
    PLAN_ENDED,
    WINDOW_CLOSED,
    Administrations,
    close_task,
    is_questionnaire_task,
    parse_instant,
    questionnaire_task,
    task_patient,
    task_window,
)
from fhir_norse.rom.invitations import Dispatcher, Invitations
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.leased import LeasedWorker
from fhir_norse.server.repository import JsonDict, Repository, loads
from fhir_norse.server.resources import reference_id
from fhir_norse.server.search.typed import Where

log = logging.getLogger(__name__)

SCHEDULER_CALLER = Caller(
    client_id="fhir-norse-scheduler", scopes=frozenset({"system/*.cruds"}), source="local"
)
DEFAULT_WINDOW = timedelta(hours=72)
ENDED_PLAN = frozenset({"completed", "revoked", "entered-in-error"})
PLAN_TYPES = ("CarePlan", "ServiceRequest")
# Appointment.status (https://hl7.org/fhir/R4/valueset-appointmentstatus.html): the one that makes a Task,
# and those that cancel the open one (module doc).
BOOKED = "booked"
CALLED_OFF = frozenset({"cancelled", "noshow", "entered-in-error"})
# CarePlan.activity.detail.status values under which an activity makes no (more) Tasks.
_ACTIVITY_STOPPED = frozenset({"cancelled", "stopped", "completed", "entered-in-error", "on-hold"})
_NAMESPACE = uuid.UUID("5d3f0c1a-8e27-5b49-a6d0-2f71c9e8b304")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400, "wk": 604800, "a": 31_557_600, "mo": 2_629_800}
_LIMIT = 10_000
LEASE_NAME = "scheduler"


def _now() -> datetime:
    return datetime.now(UTC)


def task_id_for(plan_ref: str, activity: int, occurrence: str) -> str:
    """The id of the Task of ``plan_ref``'s activity ``activity`` for ``occurrence`` (an instant, or
    :func:`appointment_key` of the Appointment it precedes): the same inputs always name the same Task."""
    return str(uuid.uuid5(_NAMESPACE, f"{plan_ref}#{activity}@{occurrence}"))


def appointment_key(ref: str, start: datetime) -> str:
    """The occurrence key of the administration before Appointment ``ref`` starting at ``start``."""
    return f"{ref}@{start.astimezone(UTC).isoformat()}"


def _declined(appointment: Mapping[str, Any], patient_id: str) -> bool:
    """Whether the patient's own participant entry of ``appointment`` says declined."""
    for participant in appointment.get("participant") or []:
        actor = (participant.get("actor") or {}).get("reference")
        if reference_id(actor, "Patient") == patient_id and participant.get("status") == "declined":
            return True
    return False


# ---------------------------------------------------------------------- plans


def duration(value: Any) -> timedelta | None:
    """A FHIR Duration (``value`` with a UCUM ``code`` or ``unit``: s, min, h, d, wk) as a timedelta."""
    if not isinstance(value, Mapping) or not isinstance(value.get("value"), int | float):
        return None
    unit = value.get("code") or value.get("unit")
    seconds = _UNITS.get(str(unit))
    return None if seconds is None else timedelta(seconds=float(value["value"]) * seconds)


def _extension(element: Mapping[str, Any], url: str) -> Any:
    return next((e for e in element.get("extension") or [] if e.get("url") == url), None)


@dataclass(frozen=True, slots=True)
class Activity:
    """One scheduled administration of a monitoring plan."""

    index: int
    questionnaire: str
    context: str | None
    window: timedelta = DEFAULT_WINDOW
    timing: Mapping[str, Any] | None = None
    before_appointment: timedelta | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """A monitoring plan as the scheduler reads it (module doc)."""

    ref: str  # CarePlan/<id> | ServiceRequest/<id>
    patient_id: str
    status: str
    activities: tuple[Activity, ...]
    episode: str | None = None
    requester: Mapping[str, Any] | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None


def _context(concept: Any) -> str | None:
    for coding in (concept or {}).get("coding") or []:
        if coding.get("system") == CS_CONTEXT and isinstance(coding.get("code"), str):
            return str(coding["code"])
    return None


def _questionnaire_of(canonicals: Any) -> str | None:
    for value in canonicals or []:
        if isinstance(value, str) and "/Questionnaire/" in value:
            return value
    return None


def _activity(
    index: int, element: Mapping[str, Any], timing: Any, questionnaire: str | None
) -> Activity | None:
    if questionnaire is None:
        return None
    window_ext = _extension(element, EXT_ANSWER_WINDOW)
    before_ext = _extension(element, EXT_BEFORE_APPOINTMENT)
    before = duration(before_ext.get("valueDuration")) if before_ext else None
    window = duration(window_ext.get("valueDuration")) if window_ext else None
    if before is None and not isinstance(timing, Mapping):
        return None
    return Activity(
        index=index,
        questionnaire=questionnaire,
        context=_context(element.get("code")),
        window=window or DEFAULT_WINDOW,
        timing=timing if isinstance(timing, Mapping) else None,
        before_appointment=before,
    )


def read_plan(res_type: str, body: Mapping[str, Any]) -> Plan | None:
    """The monitoring plan in a CarePlan or a plan ServiceRequest; None when it is not one."""
    patient_id = reference_id((body.get("subject") or {}).get("reference"), "Patient")
    if patient_id is None or body.get("intent") != "plan":
        return None
    activities: list[Activity] = []
    if res_type == "CarePlan":
        for n, item in enumerate(body.get("activity") or []):
            detail = item.get("detail") or {}
            if detail.get("kind") not in (None, "Task") or detail.get("status") in _ACTIVITY_STOPPED:
                continue
            found = _activity(
                n,
                detail,
                detail.get("scheduledTiming"),
                _questionnaire_of(detail.get("instantiatesCanonical")),
            )
            if found is not None:
                activities.append(found)
        period = body.get("period") or {}
        lower = parse_instant(period.get("start")) or parse_instant(body.get("created"))
        upper = parse_instant(period.get("end"))
    elif res_type == "ServiceRequest":
        found = _activity(
            0, body, body.get("occurrenceTiming"), _questionnaire_of(body.get("instantiatesCanonical"))
        )
        if found is not None:
            activities.append(found)
        lower, upper = parse_instant(body.get("authoredOn")), None
    else:
        return None
    if not activities:
        return None
    episode_ext = _extension(body, EPISODE_EXTENSION)
    episode = ((episode_ext or {}).get("valueReference") or {}).get("reference")
    requester = body.get("author") if res_type == "CarePlan" else body.get("requester")
    return Plan(
        ref=f"{res_type}/{body.get('id')}",
        patient_id=patient_id,
        status=str(body.get("status")),
        activities=tuple(activities),
        episode=episode if isinstance(episode, str) else None,
        requester=requester if isinstance(requester, Mapping) else None,
        not_before=lower,
        not_after=upper,
    )


def occurrences(
    timing: Mapping[str, Any], zone: ZoneInfo, since: datetime, until: datetime
) -> Iterator[datetime]:
    """The instants (aware UTC) in ``[since, until]`` at which ``timing`` (``Timing.repeat`` with
    ``dayOfWeek``/``timeOfDay``/``period``/``periodUnit``/``boundsPeriod``) falls, in time zone ``zone``."""
    repeat = timing.get("repeat") or {}
    days = [d for d in repeat.get("dayOfWeek") or [] if d in _DAYS]
    times = [time.fromisoformat(t) for t in repeat.get("timeOfDay") or []] or [time(8, 0)]
    unit = repeat.get("periodUnit") or ("wk" if days else "d")
    period = repeat.get("period")
    every = int(period) if isinstance(period, int | float) and period >= 1 else 1
    bounds = repeat.get("boundsPeriod") or {}
    lower, upper = parse_instant(bounds.get("start")), parse_instant(bounds.get("end"))
    anchor: date = (lower or datetime(2000, 1, 3, tzinfo=UTC)).astimezone(zone).date()
    day = since.astimezone(zone).date() - timedelta(days=1)
    last = until.astimezone(zone).date()
    while day <= last:
        if unit == "wk":
            weeks = (day - (anchor - timedelta(days=anchor.weekday()))).days // 7
            due = (not days or _DAYS[day.weekday()] in days) and weeks % every == 0
            if not days:
                due = due and day.weekday() == anchor.weekday()
        elif unit == "d":
            due = (day - anchor).days % every == 0 and (not days or _DAYS[day.weekday()] in days)
        else:
            due = False
        if due:
            for moment in times:
                at = datetime.combine(day, moment, tzinfo=zone).astimezone(UTC)
                if since <= at <= until and (lower is None or at >= lower) and (upper is None or at < upper):
                    yield at
        day += timedelta(days=1)


# ---------------------------------------------------------------------- the scheduler


@dataclass
class TickReport:
    """What one tick did (counts), for logs and tests."""

    ran: bool = True
    tasks_created: list[str] = field(default_factory=list)
    tasks_failed: list[str] = field(default_factory=list)
    tasks_cancelled: list[str] = field(default_factory=list)
    requests_created: list[str] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)
    jobs: dict[str, Any] = field(default_factory=dict)  # what each extra job returned (None if it failed)


class Scheduler(LeasedWorker):
    """Runs :meth:`tick` every ``interval_s`` in a daemon thread while this worker holds the lease
    (module doc)."""

    thread_name = "fhir-norse-scheduler"
    lease_name = LEASE_NAME

    def __init__(
        self,
        service: FhirService,
        *,
        administrations: Administrations,
        invitations: Invitations,
        dispatcher: Dispatcher,
        timezone: str,
        clinic_name: str,
        interval_s: float,
        now: Callable[[], datetime] = _now,
        lease_s: float | None = None,
    ) -> None:
        super().__init__(
            service.storage,
            interval_s=interval_s,
            lease=timedelta(seconds=lease_s if lease_s is not None else max(60.0, 3 * interval_s)),
        )
        self.service = service
        self.administrations = administrations
        self.invitations = invitations
        self.dispatcher = dispatcher
        self.links = administrations.links
        self.zone = ZoneInfo(timezone)
        self.clinic_name = clinic_name
        self.now = now
        self.ctx = RequestContext(caller=SCHEDULER_CALLER, base_url="urn:fhir-norse:scheduler")
        self._jobs: list[tuple[str, Callable[[], object]]] = []

    def add_job(self, job: Callable[[], object], *, name: str | None = None) -> None:
        """Run ``job`` at the end of every tick, under the same lease (one worker at a time). Work that
        is slow or may fail on its own belongs here rather than in a request: the job's exception is
        logged and the tick goes on; ``job`` must be safe to run again after a crash."""
        self._jobs.append((name or getattr(job, "__qualname__", None) or repr(job), job))

    # ------------------------------------------------------------------ the tick
    def tick(self, now: datetime | None = None) -> TickReport:
        """One round (module doc), if this worker holds the lease; else nothing (``ran`` False)."""
        now = now or self.now()
        if not self.acquire(now):
            return TickReport(ran=False)
        return self.work(now)

    def work(self, now: datetime) -> TickReport:
        """The steps of a tick without the lease (each step is safe to run twice at once)."""
        report = TickReport()
        report.tasks_created = self.create_due_tasks(now)
        failed, cancelled = self.close_tasks(now)
        report.tasks_failed, report.tasks_cancelled = failed, cancelled
        report.requests_created = self.create_invitations(now)
        report.messages = self.dispatcher.dispatch(now)
        for name, job in self._jobs:
            try:
                report.jobs[name] = job()
            except Exception:
                report.jobs[name] = None
                log.exception("scheduler job %s failed; the next tick runs it again", name)
        return report

    def _plans(self, repo: Repository) -> Iterator[Plan]:
        for res_type in PLAN_TYPES:
            where = Where(res_type, tokens={"status": "active", "intent": "plan"})
            for stored in repo.find(where, _LIMIT):
                plan = read_plan(res_type, {**loads(stored.body_text), "id": stored.res_id})
                if plan is not None:
                    yield plan

    def create_due_tasks(self, now: datetime) -> list[str]:
        """Tasks of active plans whose window is open at ``now`` and that do not exist yet. What is
        missing is found in a read; only plans with a Task to create open a write transaction."""
        created: list[str] = []
        missing: list[tuple[Plan, list[tuple[Activity, str, datetime, datetime]]]] = []
        with self.service.session(self.ctx, read_only=True) as repo:
            for plan in self._plans(repo):
                due = [
                    (activity, key, start, end)
                    for activity in plan.activities
                    for key, start, end in self._due(repo, plan, activity, now)
                    if repo.uow.current("Task", task_id_for(plan.ref, activity.index, key)) is None
                ]
                if due:
                    missing.append((plan, due))
        for plan, due in missing:
            try:
                created += self._plan_tasks(plan, due, now)
            except FhirError as error:
                log.warning("%s: no Tasks created (%s)", plan.ref, error.message)
        return created

    def _due(
        self, repo: Repository, plan: Plan, activity: Activity, now: datetime
    ) -> Iterator[tuple[str, datetime, datetime]]:
        """(occurrence key, window start, window end) of each administration whose window is open now."""
        if activity.timing is not None:
            for at in occurrences(activity.timing, self.zone, now - activity.window, now):
                if (plan.not_before is None or at >= plan.not_before) and (
                    plan.not_after is None or at < plan.not_after
                ):
                    end = at + activity.window
                    if at <= now < end:
                        yield at.isoformat(), at, end
        if activity.before_appointment is not None:
            for ref, start in self._appointments(repo, plan.patient_id):
                opens = start - activity.before_appointment
                if (
                    opens <= now < start
                    and (plan.not_before is None or start >= plan.not_before)
                    and (plan.not_after is None or start < plan.not_after)
                ):
                    # The start is part of the key: a moved Appointment is another administration.
                    yield appointment_key(ref, start), opens, start

    def _appointments(self, repo: Repository, patient_id: str) -> Iterator[tuple[str, datetime]]:
        """(``Appointment/<id>``, start) of the patient's booked Appointments."""
        where = Where(
            "Appointment", references={"patient": f"Patient/{patient_id}"}, tokens={"status": BOOKED}
        )
        for stored in repo.find(where, _LIMIT):
            body = loads(stored.body_text)
            start = parse_instant(body.get("start"))
            if start is not None and not _declined(body, patient_id):
                yield f"Appointment/{stored.res_id}", start

    def _plan_tasks(
        self, plan: Plan, due: list[tuple[Activity, str, datetime, datetime]], now: datetime
    ) -> list[str]:
        created: list[str] = []
        with self.service.session(self.ctx) as repo:
            for activity, key, start, end in due:
                task_id = task_id_for(plan.ref, activity.index, key)
                # Check-then-create under a lock on the id: another worker may have made it since the
                # read (PostgreSQL; SQLite has one writer at a time anyway).
                repo.serialize(f"task:{task_id}")
                if repo.uow.current("Task", task_id) is not None:
                    continue
                body = questionnaire_task(
                    task_id=task_id,
                    patient_id=plan.patient_id,
                    questionnaire=activity.questionnaire,
                    start=start,
                    end=end,
                    authored=now,
                    requester=plan.requester or {"display": self.clinic_name},
                    context=activity.context,
                    based_on=plan.ref,
                )
                if plan.episode is not None:
                    body["extension"] = [
                        *body.get("extension", []),
                        {"url": EPISODE_EXTENSION, "valueReference": {"reference": plan.episode}},
                    ]
                appointment = key.partition("@")[0] if key.startswith("Appointment/") else None
                if appointment is not None:
                    # Why the Task exists now: the visit it prepares (read back when the visit changes).
                    body["reasonReference"] = {"reference": appointment}
                repo.create("Task", body, res_id=task_id)
                created.append(task_id)
        return created

    def open_tasks(self, repo: Repository) -> list[JsonDict]:
        """Every open questionnaire Task (any creator)."""
        out: list[JsonDict] = []
        for status in sorted(OPEN_STATUSES):
            for stored in repo.find(Where("Task", tokens={"status": status}), _LIMIT):
                body = {**loads(stored.body_text), "id": stored.res_id}
                if is_questionnaire_task(body):
                    out.append(body)
        return out

    def close_tasks(self, now: datetime) -> tuple[list[str], list[str]]:
        """Fail open Tasks whose window passed; cancel those of ended or deleted plans and of cancelled or
        moved Appointments; their links are revoked once that is committed."""
        failed: list[str] = []
        cancelled: list[str] = []
        with self.service.session(self.ctx, read_only=True) as repo:
            tasks = self.open_tasks(repo)
        for task in tasks:
            _, end = task_window(task)
            if end is not None and now >= end:
                if self._close(task["id"], "failed", WINDOW_CLOSED, now):
                    failed.append(task["id"])
                continue
            reason = self._cancel_reason(task)
            if reason is not None and self._close(task["id"], "cancelled", reason, now):
                cancelled.append(task["id"])
        for task_id in failed + cancelled:
            self.links.revoke(task_id)
        return failed, cancelled

    def _current(self, ref: Any, types: Collection[str]) -> tuple[bool, JsonDict | None] | None:
        """(deleted, body) of the local resource ``ref`` names, if one of ``types``; None when it is not
        such a reference or was never stored."""
        if not isinstance(ref, str) or ref.count("/") != 1:
            return None
        res_type, _, res_id = ref.partition("/")
        if res_type not in types:
            return None
        with self.service.storage.read() as view:
            stored = view.current(res_type, res_id)
        if stored is None:
            return None
        return (True, None) if stored.deleted else (False, loads(stored.body_text))

    def _cancel_reason(self, task: Mapping[str, Any]) -> str | None:
        """Why an open Task made from a plan must be cancelled (module doc), or None."""
        from_plan = False
        for based in task.get("basedOn") or []:
            found = self._current(based.get("reference"), PLAN_TYPES)
            if found is None:
                continue
            from_plan = True
            deleted, body = found
            if deleted or (body or {}).get("status") in ENDED_PLAN:
                return PLAN_ENDED
        if not from_plan:
            return None  # a Task an EHR or a clinician made: its visit is theirs to follow
        found = self._current((task.get("reasonReference") or {}).get("reference"), ("Appointment",))
        if found is None:
            return None
        deleted, body = found
        patient_id = task_patient(task)
        if deleted or body is None or body.get("status") in CALLED_OFF:
            return APPOINTMENT_CANCELLED
        if patient_id is not None and _declined(body, patient_id):
            return APPOINTMENT_CANCELLED
        _, end = task_window(task)
        start = parse_instant(body.get("start"))
        # The window end is stored to the millisecond; a start given more finely has not moved.
        if start is not None and end is not None and abs(start - end) >= timedelta(milliseconds=1):
            return APPOINTMENT_MOVED
        return None

    def _close(self, task_id: str, status: str, reason: str, now: datetime) -> bool:
        with self.service.session(self.ctx) as repo:
            stored = repo.current_locked("Task", task_id)
            if stored is None or stored.deleted:
                return False
            task = loads(stored.body_text)
            if task.get("status") not in OPEN_STATUSES:
                return False
            repo.update("Task", task_id, close_task(task, status, reason, now))
        return True

    def create_invitations(self, now: datetime) -> list[str]:
        """The invitations and reminders due for open Tasks."""
        created: list[str] = []
        with self.service.session(self.ctx, read_only=True) as repo:
            tasks = [t for t in self.open_tasks(repo) if self.invitations.wanted(repo, t, now)]
        for task in tasks:
            with self.service.session(self.ctx) as repo:
                created += self.invitations.ensure(repo, task, now)
        return created
