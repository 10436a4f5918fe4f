"""The clinician's feedback report: time to assemble it, to draw the HTML with its charts, and the PDF.

    python -m bench.report_render sqlite:///var/fhir-norse.sqlite3 [--runs 5]

On a database with the demo clinic (``fhir-norse demo``; ``make serve`` loads it): Sonja (13 reports) and
Harald (33). Each run reads the report from the database (:func:`~fhir_norse.rom.report.assemble_report`),
renders the HTML (Altair charts drawn to SVG by vl-convert) and the PDF (WeasyPrint); the median of the
runs after the first (which pays the imports) is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

from fhir_norse.auth.caller import Caller
from fhir_norse.compose import build_service
from fhir_norse.config import Settings
from fhir_norse.rom.report import assemble_report
from fhir_norse.server.context import RequestContext
from fhir_norse.server.repository import loads
from fhir_norse.server.search.typed import Where
from fhir_norse.web.report import ReportPages


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report_render")
    parser.add_argument("database_url")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    service = build_service(Settings(database_url=args.database_url, mode="development"))
    ctx = RequestContext(caller=Caller.operator(), base_url="http://127.0.0.1:8080/fhir")
    pages = ReportPages()
    with service.session(ctx, read_only=True) as repo:
        found = repo.find(Where("Patient"), 100)
        patients = {loads(r.body_text)["name"][0]["given"][0]: r.res_id for r in found}
    for name in ("Sonja", "Harald"):
        times: dict[str, list[float]] = {"assemble": [], "html": [], "pdf": []}
        size = 0
        for _ in range(max(2, args.runs)):
            t0 = time.perf_counter()
            with service.session(ctx, read_only=True) as repo:
                report = assemble_report(repo, patients[name])
            t1 = time.perf_counter()
            pages.report_html(report, "nb", pdf_url=None, all_scales_url=None, other_lang_url=None)
            t2 = time.perf_counter()
            size = len(pages.report_pdf(report, "nb"))
            t3 = time.perf_counter()
            times["assemble"].append(t1 - t0)
            times["html"].append(t2 - t1)
            times["pdf"].append(t3 - t2)
        median = {k: f"{statistics.median(v[1:]) * 1000:.0f} ms" for k, v in times.items()}
        print(
            f"{name}: assemble {median['assemble']}, HTML with charts {median['html']}, "
            f"PDF {median['pdf']} ({size // 1024} KiB); median of runs 2-{len(times['pdf'])}"
        )
    service.storage.engine.dispose()


if __name__ == "__main__":
    main()
