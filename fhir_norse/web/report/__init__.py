"""The clinician's feedback report and caseload pages (issue 17): HTML with server-side SVG charts, and
the report as an A4 PDF. See pages.py."""

from fhir_norse.web.report.pages import STATIC, STYLESHEET_URL, ReportPages
from fhir_norse.web.report.texts import Lang

__all__ = ["STATIC", "STYLESHEET_URL", "Lang", "ReportPages"]
