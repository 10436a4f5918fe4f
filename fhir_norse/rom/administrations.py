"""Administrations as FHIR work items: the SDC questionnaire Task and its lifecycle.

https://hl7.org/fhir/uv/sdc/StructureDefinition-sdc-task.html (SDC "Questionnaire Task"): one Task per
time a patient is asked to answer a form, whoever created it (the scheduler from a monitoring plan,
``fhir-norse invite``, or an EHR over FHIR):

* ``code`` ``complete-questionnaire`` (``http://hl7.org/fhir/uv/sdc/CodeSystem/temp``), ``intent`` order;
* ``for`` and ``owner`` the Patient (the patient does the work), ``requester`` the plan's Organization or
  Practitioner, else the clinic by name;
* ``input`` of type ``questionnaire``: the canonical to answer; ``restriction.period``: the window in
  which it can be answered; ``authoredOn``;
* ``output`` of type ``questionnaire-response``: the QuestionnaireResponse, from the first saved page on;
* the administration context (intake | weekly | termination) as the project's ``administration-context``
  extension, as on the response itself (:func:`fhir_norse.rom.patient.context_extension`).

Lifecycle: ``requested`` -> ``in-progress`` (:meth:`Administrations.start`, the first answer saved) ->
``completed`` (:meth:`Administrations.complete`, the response stored and scored); or ``cancelled``
(the plan ended, or the Appointment it prepares was cancelled or moved) / ``failed`` (the window
closed), each with ``statusReason`` saying why (:func:`close_task`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fhir_norse.outcomes import Conflict, NotFound
from fhir_norse.rom.patient import context_extension
from fhir_norse.server.after_commit import after_commit
from fhir_norse.server.repository import JsonDict, Repository, loads
from fhir_norse.server.resources import instant, reference_id

if TYPE_CHECKING:
    from fhir_norse.auth.links import PersonalLinks

SDC_TASK_PROFILE = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-task"
TASK_CODE_SYSTEM = "http://hl7.org/fhir/uv/sdc/CodeSystem/temp"
COMPLETE_QUESTIONNAIRE = "complete-questionnaire"

# Task statuses in which the patient may still answer (SDC uses requested and in-progress; an EHR may
# move a Task through the other workflow states first).
OPEN_STATUSES = frozenset({"requested", "received", "accepted", "ready", "in-progress"})
_FAILED = frozenset({"failed", "rejected"})
_CANCELLED = frozenset({"cancelled", "entered-in-error", "on-hold"})

WINDOW_CLOSED = "the answer window closed before the questionnaire was answered"
PLAN_ENDED = "the monitoring plan was ended"
APPOINTMENT_CANCELLED = "the appointment it prepares was cancelled"
APPOINTMENT_MOVED = "the appointment it prepares was moved to another time"


def _now() -> datetime:
    return datetime.now(UTC)


def fhir_instant(moment: datetime) -> str:
    """A timezone-aware moment as a FHIR instant in UTC."""
    return instant(moment.astimezone(UTC).replace(tzinfo=None))


def parse_instant(value: Any) -> datetime | None:
    """A FHIR dateTime/instant as an aware UTC datetime (a date alone: its midnight UTC); None if absent
    or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    text = value.replace("Z", "+00:00")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _coding(code: str) -> JsonDict:
    return {"coding": [{"system": TASK_CODE_SYSTEM, "code": code}]}


def questionnaire_task(
    *,
    task_id: str,
    patient_id: str,
    questionnaire: str,
    start: datetime,
    end: datetime,
    authored: datetime,
    requester: Mapping[str, Any] | None = None,
    context: str | None = None,
    based_on: str | None = None,
) -> dict[str, Any]:
    """The SDC questionnaire Task (module doc) asking Patient ``patient_id`` to answer ``questionnaire``
    between ``start`` and ``end``."""
    patient = {"reference": f"Patient/{patient_id}"}
    task: JsonDict = {
        "resourceType": "Task",
        "id": task_id,
        "meta": {"profile": [SDC_TASK_PROFILE]},
    }
    if context is not None:
        task["extension"] = [context_extension(context)]
    if based_on is not None:
        task["basedOn"] = [{"reference": based_on}]
    task |= {
        "status": "requested",
        "intent": "order",
        "code": _coding(COMPLETE_QUESTIONNAIRE),
        "for": patient,
        "authoredOn": fhir_instant(authored),
    }
    if requester is not None:
        task["requester"] = dict(requester)
    task |= {
        "owner": patient,
        "restriction": {"period": {"start": fhir_instant(start), "end": fhir_instant(end)}},
        "input": [{"type": _coding("questionnaire"), "valueCanonical": questionnaire}],
    }
    return task


def _has_code(concept: Any, code: str) -> bool:
    return isinstance(concept, Mapping) and any(
        c.get("system") == TASK_CODE_SYSTEM and c.get("code") == code for c in concept.get("coding") or []
    )


def task_questionnaire(task: Mapping[str, Any]) -> str | None:
    """The canonical of the Questionnaire the Task asks for (its ``questionnaire`` input)."""
    for item in task.get("input") or []:
        if _has_code(item.get("type"), "questionnaire"):
            value = item.get("valueCanonical")
            if isinstance(value, str) and value:
                return value
    return None


def task_window(task: Mapping[str, Any]) -> tuple[datetime | None, datetime | None]:
    """(start, end) of ``restriction.period`` (None where open)."""
    period = (task.get("restriction") or {}).get("period") or {}
    return parse_instant(period.get("start")), parse_instant(period.get("end"))


def task_patient(task: Mapping[str, Any]) -> str | None:
    """The id of the Patient in ``Task.for``."""
    return reference_id((task.get("for") or {}).get("reference"), "Patient")


def task_owner_is_patient(task: Mapping[str, Any]) -> bool:
    """Whether the Patient the Task is for does the work (``owner`` that Patient, or no owner)."""
    patient = task_patient(task)
    owner = (task.get("owner") or {}).get("reference")
    return patient is not None and (owner is None or reference_id(owner, "Patient") == patient)


def is_questionnaire_task(task: Mapping[str, Any]) -> bool:
    """Whether a Task asks for a Questionnaire to be answered (by its code, else by its input)."""
    if task.get("resourceType") not in (None, "Task"):
        return False
    return _has_code(task.get("code"), COMPLETE_QUESTIONNAIRE) or task_questionnaire(task) is not None


def task_output(task: Mapping[str, Any]) -> str | None:
    """The QuestionnaireResponse reference in the Task's output, if any."""
    for item in task.get("output") or []:
        if _has_code(item.get("type"), "questionnaire-response"):
            ref = (item.get("valueReference") or {}).get("reference")
            if isinstance(ref, str):
                return ref
    return None


def _with_output(task: JsonDict, response_ref: str) -> JsonDict:
    outputs = [o for o in task.get("output") or [] if not _has_code(o.get("type"), "questionnaire-response")]
    outputs.append({"type": _coding("questionnaire-response"), "valueReference": {"reference": response_ref}})
    return {**task, "output": outputs}


def close_task(task: Mapping[str, Any], status: str, reason: str, now: datetime) -> JsonDict:
    """``task`` ended as ``status`` (cancelled | failed) with ``statusReason`` ``reason``."""
    out = {k: v for k, v in task.items() if k != "meta"}
    out["status"] = status
    out["statusReason"] = {"text": reason}
    out["lastModified"] = fhir_instant(now)
    return out


class Administrations:
    """The Task lifecycle steps the patient's form takes (module doc). Writes go through the server's
    repository on the caller's transaction, after the caller's own checks."""

    def __init__(self, links: PersonalLinks, *, now: Callable[[], datetime] = _now) -> None:
        self.links = links
        self.now = now

    def open_status(self, task: Mapping[str, Any], now: datetime) -> str | None:
        """None when the Task can be answered at ``now``; else why not: completed, cancelled, failed,
        not-yet (its window has not opened) or closed (its window has passed)."""
        status = task.get("status")
        if status == "completed":
            return "completed"
        if status in _FAILED:
            return "failed"
        if status not in OPEN_STATUSES:
            return "cancelled"
        start, end = task_window(task)
        if start is not None and now < start:
            return "not-yet"
        if end is not None and now >= end:
            return "closed"
        return None

    def _locked(self, repo: Repository, task_id: str) -> tuple[Repository, JsonDict]:
        server = repo.as_server()
        stored = server.current_locked("Task", task_id)
        if stored is None or stored.deleted:
            raise NotFound(f"Task/{task_id} is not known")
        return server, loads(stored.body_text)

    def start(self, repo: Repository, task_id: str, response_ref: str) -> dict[str, Any]:
        """requested -> in-progress with ``output`` = ``response_ref`` (idempotent)."""
        server, task = self._locked(repo, task_id)
        if task.get("status") == "in-progress" and task_output(task) == response_ref:
            return task
        reason = self.open_status(task, self.now())
        if reason is not None:
            raise Conflict(f"Task/{task_id} cannot be answered now ({reason})")
        now = fhir_instant(self.now())
        body = {k: v for k, v in _with_output(task, response_ref).items() if k != "meta"}
        body["status"] = "in-progress"
        body["lastModified"] = now
        body["executionPeriod"] = {**(task.get("executionPeriod") or {})}
        body["executionPeriod"].setdefault("start", now)
        outcome = server.update("Task", task_id, body)
        assert outcome.body is not None
        return outcome.body

    def complete(self, repo: Repository, task_id: str, response_ref: str) -> dict[str, Any]:
        """-> completed with ``output`` = ``response_ref``; the Task's personal links are marked
        completed once the transaction has committed (idempotent for the same response)."""
        server, task = self._locked(repo, task_id)
        if task.get("status") == "completed":
            if task_output(task) == response_ref:
                return task
            raise Conflict(f"Task/{task_id} was completed with another response")
        if task.get("status") not in OPEN_STATUSES:
            raise Conflict(f"Task/{task_id} is {task.get('status')} and can no longer be completed")
        now = fhir_instant(self.now())
        body = {k: v for k, v in _with_output(task, response_ref).items() if k != "meta"}
        body["status"] = "completed"
        body["lastModified"] = now
        body["executionPeriod"] = {"start": now, **(task.get("executionPeriod") or {}), "end": now}
        outcome = server.update("Task", task_id, body)
        links = self.links
        after_commit(repo, lambda: links.complete(task_id))
        assert outcome.body is not None
        return outcome.body
