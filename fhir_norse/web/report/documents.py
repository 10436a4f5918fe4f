"""The feedback report into the EHR (issue 17): each scored administration's PDF as ``presentedForm`` and
a DocumentReference.

For every scored ``rom-report`` DiagnosticReport (status ``final`` or ``amended``) that has no document
yet, :meth:`ReportDocuments.render_pending` assembles the report as of that administration
(:func:`~fhir_norse.rom.report.assemble_report`), renders it as the A4 PDF the report page offers
(:meth:`~fhir_norse.web.report.pages.ReportPages.report_pdf`) and then, in **one** transaction, as the
local operator (audited like any write):

* creates a ``Binary`` (https://hl7.org/fhir/R4/binary.html) holding the PDF, whose ``securityContext``
  is the DiagnosticReport: it belongs to the same patient's compartment, so a ``patient/`` or ``user/``
  token reaches it exactly when it reaches the report (:mod:`fhir_norse.auth.compartment`);
* updates the DiagnosticReport: ``presentedForm`` gets the PDF's Attachment
  (https://hl7.org/fhir/R4/datatypes.html#Attachment: ``contentType`` application/pdf, ``language``,
  ``url`` ``Binary/<id>``, ``size``, ``hash`` the base64 SHA-1 of the bytes, ``title``, ``creation``).
  DiagnosticReport has no storage hook, so this write re-triggers neither scoring nor alerts (those
  follow QuestionnaireResponse writes only, :mod:`fhir_norse.rom.intake`);
* creates a DocumentReference (https://hl7.org/fhir/R4/documentreference.html), what document archives
  and EHRs list: ``status`` current, ``docStatus`` final (amended for an amended report), ``type`` LOINC
  11506-3 "Progress note" (a LOINC document code archives know; the report is a progress note written
  before a session) with the project's ``rom-feedback-report`` code, ``category`` the project's
  ``rom``, ``subject``, ``date``, ``author`` and ``custodian`` from the administration's EpisodeOfCare
  (care manager, managing organization) when known, ``content`` the same Attachment, and
  ``context.related`` the DiagnosticReport. Its ``identifier`` names the DiagnosticReport version the
  PDF was made from and it is created conditionally on it (``If-None-Exist``), so a retry never makes a
  second one.

**Which reports are pending** is kept in one small table (:data:`~fhir_norse.store.document_tables.
REPORT_DOCUMENT`, revision 0010): per DiagnosticReport the version that carries its current document.
One indexed query finds rom-report DiagnosticReports whose current version differs from it, without
reading a body; a search could not (``presentedForm`` is no search parameter, and reading every report
on every tick grows with the record). A report scored again (an amended response) is a new version
written by scoring without ``presentedForm``: its answers changed, so it gets a new PDF and a new
DocumentReference that ``replaces`` the earlier one (``relatesTo``), which becomes ``superseded``. Any
other new version is treated alike: what the PDF shows may have changed, and re-rendering is cheaper
than deciding whether it did. A report withdrawn (``entered-in-error``, ``cancelled``) or deleted has
its document marked ``entered-in-error``.

A report that fails (it cannot be assembled or rendered, or a write is refused) is logged and tried
again later, with a growing pause (:data:`RETRY_AFTER`, doubling up to :data:`RETRY_MAX`); it never
holds up the others, which are taken first. Rendering takes about two seconds per PDF, so it never runs
inside a scoring transaction: the scheduler's tick calls :meth:`ReportDocuments.render_pending`
(:meth:`fhir_norse.rom.scheduler.Scheduler.add_job`), one worker at a time.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from fhir_norse.auth.caller import Caller
from fhir_norse.canonicals import BASE, CS_ROM, LOINC, PROFILE_REPORT
from fhir_norse.rom.report import PatientReport, assemble_report
from fhir_norse.server.context import RequestContext
from fhir_norse.server.interactions import FhirService
from fhir_norse.server.repository import JsonDict, Repository, loads
from fhir_norse.server.resources import reference_id
from fhir_norse.store.document_tables import REPORT_DOCUMENT
from fhir_norse.store.tables import ResourceRow, UriIndex
from fhir_norse.web.report.pages import ReportPages
from fhir_norse.web.report.texts import Lang, format_date

log = logging.getLogger(__name__)

__all__ = ["DOCUMENT_SYSTEM", "ReportDocuments"]

# The identifier system of the documents: the value names the DiagnosticReport version rendered.
DOCUMENT_SYSTEM = f"{BASE}/report-document"
PDF = "application/pdf"
# "corrected" is an amendment that corrects an error (https://hl7.org/fhir/R4/valueset-diagnostic-report-status.html).
RENDERED = frozenset({"final", "amended", "corrected"})
WITHDRAWN = frozenset({"entered-in-error", "cancelled"})
RETRY_AFTER = timedelta(minutes=5)
RETRY_MAX = timedelta(hours=24)
_NAMESPACE = uuid.UUID("0b6f3d52-6a8e-5c1f-9d27-4e1a8c5b7f90")
_TYPE_CODINGS = (
    {"system": LOINC, "code": "11506-3", "display": "Progress note"},
    {"system": CS_ROM, "code": "rom-feedback-report", "display": "Clinical feedback report"},
)
_CATEGORY_CODINGS = ({"system": CS_ROM, "code": "rom", "display": "Routine outcome monitoring"},)
_WORDS = {
    "nb": {"title": "Tilbakemeldingsrapport", "administration": "administrasjon"},
    "en": {"title": "Feedback report", "administration": "administration"},
}


def _now() -> datetime:
    return datetime.now(UTC)


def _instant(moment: datetime) -> str:
    """An R4 instant to the millisecond, in UTC."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


def document_ids(report_id: str, version: int) -> tuple[str, str]:
    """(Binary id, DocumentReference id) of the document of DiagnosticReport ``report_id`` at ``version``:
    the same version always names the same resources."""
    key = f"DiagnosticReport/{report_id}/_history/{version}"
    return str(uuid.uuid5(_NAMESPACE, f"{key}#binary")), str(uuid.uuid5(_NAMESPACE, f"{key}#document"))


@dataclass(frozen=True, slots=True)
class _Source:
    """What one pending DiagnosticReport version needs rendered, read in one transaction."""

    report: PatientReport
    status: str
    authors: tuple[JsonDict, ...]
    custodian: JsonDict | None


class ReportDocuments:
    """Renders the pending reports' PDFs into the record (module doc)."""

    def __init__(
        self,
        service: FhirService,
        pages: ReportPages,
        *,
        lang: Lang = "nb",
        now: Callable[[], datetime] | None = None,
    ) -> None:
        """``lang``: the language of the PDFs (the record's documents are in one); ``now``: the clock."""
        self.service = service
        self.pages = pages
        self.lang: Lang = lang
        self.now = now or _now
        self.ctx = RequestContext(caller=Caller.operator(), base_url="urn:fhir-norse:report-documents")

    # ------------------------------------------------------------------ which reports
    def pending(self, limit: int, now: datetime) -> list[tuple[str, int]]:
        """(DiagnosticReport id, current version) of up to ``limit`` rom-report DiagnosticReports whose
        current version has no document yet and is not waiting to be retried; those that never failed
        first, then the oldest. Deleted ones with a document are included (their version is 0)."""
        r, u, d = ResourceRow.__table__, UriIndex.__table__, REPORT_DOCUMENT  # type: ignore[attr-defined]
        due = sa.or_(d.c.retry_at.is_(None), d.c.retry_at <= _naive(now))
        live = (
            sa.select(r.c.res_id, r.c.version, sa.func.coalesce(d.c.failures, 0).label("failures"), r.c.pk)
            .select_from(r.join(u, u.c.resource_pk == r.c.pk).outerjoin(d, d.c.report_id == r.c.res_id))
            .where(
                r.c.res_type == "DiagnosticReport",
                u.c.res_type == "DiagnosticReport",
                u.c.param == "_profile",
                u.c.value == PROFILE_REPORT,
                sa.or_(d.c.report_id.is_(None), sa.and_(d.c.version != r.c.version, due)),
            )
            .order_by(sa.func.coalesce(d.c.failures, 0), r.c.last_updated, r.c.pk)
            .limit(limit)
        )
        # A deleted resource keeps no index rows: its document is found through the table.
        gone = (
            sa.select(d.c.report_id)
            .select_from(d.join(r, sa.and_(r.c.res_type == "DiagnosticReport", r.c.res_id == d.c.report_id)))
            .where(r.c.deleted.is_(True), d.c.document_id.is_not(None), due)
            .limit(limit)
        )
        with self.service.storage.read() as view:
            out = [(str(row.res_id), int(row.version)) for row in view.conn.execute(live)]
            out += [(str(row.report_id), 0) for row in view.conn.execute(gone)]
        return out[:limit]

    # ------------------------------------------------------------------ the job
    def render_pending(self, limit: int = 5) -> int:
        """Give up to ``limit`` pending DiagnosticReports their document (module doc); the number of
        documents created. A failure of one is logged and retried later."""
        now = self.now()
        created = 0
        for report_id, version in self.pending(limit, now):
            try:
                created += self.render(report_id, version, now)
            except Exception as error:  # one report's failure must not stop the others
                log.warning(
                    "DiagnosticReport/%s: no PDF document this time (%s: %s); tried again later",
                    report_id,
                    type(error).__name__,
                    getattr(error, "message", None) or error,
                )
                self._failed(report_id, now)
        return created

    def render(self, report_id: str, version: int, now: datetime) -> bool:
        """The document of DiagnosticReport ``report_id`` at ``version`` (0: it was deleted); whether
        one was created. Nothing is written when the report changed in between (the next run takes the
        new version)."""
        with self.service.session(self.ctx, read_only=True) as repo:
            stored = repo.get("DiagnosticReport", report_id)
            if stored is None:
                source, status = None, "deleted"
            else:
                if stored.version != version:
                    return False
                body = loads(stored.body_text)
                status = str(body.get("status"))
                source = self._source(repo, report_id, body) if status in RENDERED else None
        if source is None:
            self._settle(report_id, version, withdraw=status in WITHDRAWN or status == "deleted", now=now)
            return False
        pdf = self.pages.report_pdf(source.report, self.lang)
        return self._store(report_id, version, source, pdf, now)

    def _source(self, repo: Repository, report_id: str, body: Mapping[str, Any]) -> _Source:
        patient_id = reference_id((body.get("subject") or {}).get("reference"), "Patient")
        if patient_id is None:
            raise ValueError("the report's subject is no local Patient")
        report = assemble_report(repo, patient_id, administration=report_id)
        authors: list[JsonDict] = []
        custodian: JsonDict | None = None
        episode_id = reference_id(report.header.episode, "EpisodeOfCare")
        episode = repo.get("EpisodeOfCare", episode_id) if episode_id else None
        if episode is not None and not episode.deleted:
            episode_body = loads(episode.body_text)
            manager = _local_reference(episode_body.get("careManager"), ("Practitioner", "PractitionerRole"))
            organization = _local_reference(episode_body.get("managingOrganization"), ("Organization",))
            authors += [ref for ref in (manager, organization) if ref is not None]
            custodian = organization
        return _Source(report, str(body.get("status")), tuple(authors), custodian)

    # ------------------------------------------------------------------ writes
    def _store(self, report_id: str, version: int, source: _Source, pdf: bytes, now: datetime) -> bool:
        binary_id, document_id = document_ids(report_id, version)
        attachment = self._attachment(source.report, pdf, binary_id, now)
        with self.service.session(self.ctx) as repo:
            repo.serialize(f"report-document:{report_id}")
            current = repo.current_locked("DiagnosticReport", report_id)
            if current is None or current.deleted or current.version != version:
                return False  # changed since it was read: the next run renders the new version
            row = self._row(repo, report_id)
            previous_document = row.document_id if row is not None else None
            previous_binary = row.binary_id if row is not None else None
            body = loads(current.body_text)
            kept = [
                a
                for a in body.get("presentedForm") or []
                if previous_binary is None or a.get("url") != f"Binary/{previous_binary}"
            ]
            body["presentedForm"] = [*kept, attachment]
            repo.create(
                "Binary",
                {
                    "resourceType": "Binary",
                    "contentType": PDF,
                    "securityContext": {"reference": f"DiagnosticReport/{report_id}"},
                    "data": base64.b64encode(pdf).decode("ascii"),
                },
                res_id=binary_id,
            )
            updated = repo.update("DiagnosticReport", report_id, body)
            document = self._document(report_id, version, document_id, source, attachment, now)
            if previous_document is not None and previous_document != document_id:
                document["relatesTo"] = [
                    {"code": "replaces", "target": {"reference": f"DocumentReference/{previous_document}"}}
                ]
                self._set_status(repo, previous_document, "superseded")
            made = repo.create(
                "DocumentReference",
                document,
                if_none_exist=f"identifier={DOCUMENT_SYSTEM}|{_identifier(report_id, version)}",
                res_id=document_id,
            )
            self._write_row(
                repo,
                report_id,
                version=updated.stored.version,
                document_id=made.stored.res_id,
                binary_id=binary_id,
                now=now,
            )
        return not made.noop

    def _attachment(self, report: PatientReport, pdf: bytes, binary_id: str, now: datetime) -> JsonDict:
        words = _WORDS[self.lang]
        h = report.header
        return {
            "contentType": PDF,
            "language": self.lang,
            "url": f"Binary/{binary_id}",
            "size": len(pdf),
            # R4 Attachment.hash: "The calculated hash of the data using SHA-1. Represented using base64."
            "hash": base64.b64encode(hashlib.sha1(pdf, usedforsecurity=False).digest()).decode("ascii"),
            "title": f"{words['title']} {h.instrument.get(self.lang)}, {words['administration']} "
            f"{h.number}, {format_date(h.date, self.lang)}",
            "creation": _instant(now),
        }

    def _document(
        self,
        report_id: str,
        version: int,
        document_id: str,
        source: _Source,
        attachment: JsonDict,
        now: datetime,
    ) -> JsonDict:
        h = source.report.header
        document: JsonDict = {
            "resourceType": "DocumentReference",
            "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{document_id}"},
            "identifier": [{"system": DOCUMENT_SYSTEM, "value": _identifier(report_id, version)}],
            "status": "current",
            "docStatus": "final" if source.status == "final" else "amended",
            "type": {"coding": [dict(c) for c in _TYPE_CODINGS], "text": _WORDS[self.lang]["title"]},
            "category": [{"coding": [dict(c) for c in _CATEGORY_CODINGS]}],
            "subject": {"reference": f"Patient/{h.patient_id}"},
            "date": _instant(now),
            "description": attachment["title"],
            "content": [{"attachment": dict(attachment)}],
            "context": {
                "period": {"start": h.authored, "end": h.authored},
                "related": [{"reference": f"DiagnosticReport/{report_id}"}],
            },
        }
        if source.authors:
            document["author"] = [dict(a) for a in source.authors]
        if source.custodian is not None:
            document["custodian"] = dict(source.custodian)
        return document

    def _set_status(self, repo: Repository, document_id: str, status: str) -> None:
        stored = repo.current_locked("DocumentReference", document_id)
        if stored is None or stored.deleted:
            return
        body = loads(stored.body_text)
        if body.get("status") != "current":
            return
        body["status"] = status
        if status == "entered-in-error":
            body["docStatus"] = "entered-in-error"
        repo.update("DocumentReference", document_id, body)

    def _settle(self, report_id: str, version: int, *, withdraw: bool, now: datetime) -> None:
        """Record that ``version`` needs no document (not final, or withdrawn); a withdrawn or deleted
        report's document is marked entered-in-error, any other keeps it (a later final version
        replaces it)."""
        with self.service.session(self.ctx) as repo:
            repo.serialize(f"report-document:{report_id}")
            row = self._row(repo, report_id)
            document_id = row.document_id if row is not None else None
            binary_id = row.binary_id if row is not None else None
            if withdraw and document_id is not None:
                self._set_status(repo, document_id, "entered-in-error")
                document_id = binary_id = None
            self._write_row(
                repo, report_id, version=version, document_id=document_id, binary_id=binary_id, now=now
            )

    def _failed(self, report_id: str, now: datetime) -> None:
        with self.service.session(self.ctx) as repo:
            repo.serialize(f"report-document:{report_id}")
            row = self._row(repo, report_id)
            failures = (row.failures if row is not None else 0) + 1
            pause = min(RETRY_AFTER * 2 ** (failures - 1), RETRY_MAX)
            values = {"failures": failures, "retry_at": _naive(now + pause), "updated_at": _naive(now)}
            t = REPORT_DOCUMENT
            if row is None:
                repo.uow.conn.execute(
                    sa.insert(t).values(
                        report_id=report_id, version=0, document_id=None, binary_id=None, **values
                    )
                )
            else:
                repo.uow.conn.execute(sa.update(t).where(t.c.report_id == report_id).values(**values))

    @staticmethod
    def _row(repo: Repository, report_id: str) -> Any:
        t = REPORT_DOCUMENT
        return repo.uow.conn.execute(sa.select(t).where(t.c.report_id == report_id)).first()

    def _write_row(
        self,
        repo: Repository,
        report_id: str,
        *,
        version: int,
        document_id: str | None,
        binary_id: str | None,
        now: datetime,
    ) -> None:
        t = REPORT_DOCUMENT
        values = {
            "version": version,
            "document_id": document_id,
            "binary_id": binary_id,
            "failures": 0,
            "retry_at": None,
            "updated_at": _naive(now),
        }
        changed = repo.uow.conn.execute(sa.update(t).where(t.c.report_id == report_id).values(**values))
        if not changed.rowcount:
            repo.uow.conn.execute(sa.insert(t).values(report_id=report_id, **values))


def _identifier(report_id: str, version: int) -> str:
    return f"DiagnosticReport/{report_id}/_history/{version}"


def _local_reference(value: Any, types: tuple[str, ...]) -> JsonDict | None:
    """``{"reference": "Type/id"}`` of a local reference to one of ``types``; None otherwise."""
    ref = value.get("reference") if isinstance(value, Mapping) else None
    if not isinstance(ref, str):
        return None
    for res_type in types:
        res_id = reference_id(ref, res_type)
        if res_id is not None:
            return {"reference": f"{res_type}/{res_id}"}
    return None
