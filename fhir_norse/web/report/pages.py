"""The clinician's feedback report and caseload as pages: Jinja2 HTML, and the report as an A4 PDF.

The facts come decided in :class:`~fhir_norse.rom.report.PatientReport`; this module words them
(texts.py), draws the charts (charts.py) and lays them out. One template serves the screen, the browser's
print and the PDF: the PDF is WeasyPrint's rendering of the same HTML (https://doc.courtbouillon.org/
weasyprint/stable/), with the style sheet's ``@page`` A4 rules and without the page's links.

Security: the pages carry no script at all and only this server's style sheet, so their
Content-Security-Policy allows nothing else (:attr:`ReportPages.headers`); the charts are inline SVG
(no image requests). WeasyPrint gets a URL fetcher that fetches nothing: no text of a record can make
the server request a URL while it renders a PDF.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from fhir_norse.rom.report import AlertLine, CaseloadRow, ChangeLine, PatientReport, Text, Trajectory
from fhir_norse.web.report.charts import ChartWords, alliance_svg, trajectory_svg
from fhir_norse.web.report.texts import (
    ALERT_SHORT,
    TEXTS,
    Lang,
    format_date,
    format_number,
    format_percent,
    join_names,
)

__all__ = ["STATIC", "STYLESHEET_URL", "Lang", "ReportPages"]

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
# Where the API mounts STATIC (the lead's route table): the page links its style sheet there.
STYLESHEET_URL = "/static/report/report.css"

# An en dash (U+2013) for "as now" and for a missing value, written as an escape: it looks like a hyphen.
DASH = "\u2013"
_ARROWS = {"more": "↑", "less": "↓", "as-now": DASH}


def _csp(frame_ancestors: str) -> str:
    return (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        f"frame-ancestors {frame_ancestors}; base-uri 'none'"
    )


@dataclass(frozen=True, slots=True)
class _Chart:
    title: str
    svg: Markup
    label: str


def _no_fetch(url: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    raise ValueError(f"the report's PDF fetches nothing ({url[:40]})")


class ReportPages:
    """Renders the report (HTML, PDF) and the caseload (HTML)."""

    def __init__(self, *, frame_ancestors: str = "'none'", stylesheet_url: str = STYLESHEET_URL) -> None:
        """``frame_ancestors``: who may frame the pages (an EHR that embeds SMART apps in a frame
        names its origin here); ``stylesheet_url``: where STATIC/report.css is served."""
        self.env = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=select_autoescape(["html"]),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.stylesheet_url = stylesheet_url
        self.headers: dict[str, str] = {
            "Content-Security-Policy": _csp(frame_ancestors),
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY" if frame_ancestors == "'none'" else "SAMEORIGIN",
        }
        if frame_ancestors != "'none'":
            # X-Frame-Options cannot name another origin; the CSP's frame-ancestors rules then.
            del self.headers["X-Frame-Options"]

    # ------------------------------------------------------------------ report
    def report_html(
        self,
        report: PatientReport,
        lang: Lang,
        *,
        pdf_url: str | None,
        all_scales_url: str | None,
        other_lang_url: str | None,
    ) -> str:
        """The report page (no script; the charts inline SVG with text alternatives)."""
        return self._report(
            report,
            lang,
            pdf=False,
            pdf_url=pdf_url,
            all_scales_url=all_scales_url,
            other_lang_url=other_lang_url,
        )

    def report_pdf(self, report: PatientReport, lang: Lang) -> bytes:
        """The same report as an A4 PDF (WeasyPrint), titled and in ``lang``."""
        from weasyprint import CSS, HTML  # imported on use: it loads Pango at import

        html = self._report(report, lang, pdf=True, pdf_url=None, all_scales_url=None, other_lang_url=None)
        document = HTML(string=html, url_fetcher=_no_fetch, base_url=str(STATIC))
        return bytes(document.write_pdf(stylesheets=[CSS(filename=str(STATIC / "report.css"))]))

    def _report(
        self,
        report: PatientReport,
        lang: Lang,
        *,
        pdf: bool,
        pdf_url: str | None,
        all_scales_url: str | None,
        other_lang_url: str | None,
    ) -> str:
        t = TEXTS[lang]
        words = ChartWords(
            administration=t["col_report"],
            score=t["col_score"],
            elevated=t["elevated_short"],
            norm="norm",
            percent="%",
            now=t["now"],
            previous=t["previous"],
            floor=t["floor"],
            rupture=t["rupture"],
            expected=t["col_expected"].split(" ")[0].lower(),
        )
        h = report.header
        context = {
            "lang": lang,
            "t": t,
            "pdf": pdf,
            "stylesheet_url": self.stylesheet_url,
            "pdf_url": pdf_url,
            "all_scales_url": None if report.all_scales else all_scales_url,
            "other_lang_url": other_lang_url,
            "other_lang": "en" if lang == "nb" else "nb",
            "title": t["report_title"].format(name=h.patient_name),
            "facts": self._header_facts(report, lang),
            "alerts": [self._alert(a, report, lang) for a in report.alerts],
            "prefer_not": report.suicide_prefer_not,
            "summary": self._summary(report, lang),
            "alliance": self._alliance(report, lang, words),
            "preferences": [
                {
                    "arrow": _ARROWS.get(p.direction or "", "?"),
                    "word": t[f"pref_{(p.direction or 'none').replace('-', '_')}"],
                    "direction": p.direction or "none",
                    "text": p.text.get(lang),
                    "changed": t["pref_never"]
                    if p.changed_at is None or p.changed_on is None
                    else t["pref_changed"].format(n=p.changed_at, date=format_date(p.changed_on, lang)),
                }
                for p in report.preferences
            ],
            "domains": [
                {
                    "name": g.name.get(lang),
                    "scales": [self._trajectory(tr, report, lang, words) for tr in g.trajectories],
                }
                for g in report.domains
            ],
            "any_expected": any(tr.expected is not None for g in report.domains for tr in g.trajectories),
            "hidden_scales": t["hidden_scales"].format(n=report.hidden_scales)
            if report.hidden_scales
            else None,
            "single": [
                {
                    "text": s.text.get(lang),
                    "value": t["not_answered"] if s.value is None else format_number(s.value, lang, 0),
                }
                for s in report.single_items
            ],
            "open_scales": [
                {
                    "name": o.name.get(lang),
                    "score": None if o.score is None else format_number(o.score, lang, 2),
                    "answers": [
                        {
                            "text": i.text.get(lang),
                            "answer": t["not_answered"] if i.answer is None else i.answer.get(lang),
                            "code": i.code,
                            "reverse": i.reverse_keyed,
                        }
                        for i in o.items
                    ],
                }
                for o in report.open_scales
            ],
        }
        return self.env.get_template("report.html").render(context)

    def _header_facts(self, report: PatientReport, lang: Lang) -> list[tuple[str, str]]:
        t = TEXTS[lang]
        h = report.header
        facts: list[tuple[str, str]] = []
        if h.birth_date is not None:
            facts.append((t["born"], format_date(h.birth_date, lang)))
        facts.append(
            (t["answered"], f"{t['administration'].format(n=h.number, of=h.of)}, {format_date(h.date, lang)}")
        )
        if h.context is not None:
            facts.append((t["context"], t[h.context]))
        if h.episode is not None:
            facts.append((t["episode"], h.episode.partition("/")[2]))
        facts.append((t["instrument"], f"{h.instrument.get(lang)} ({h.questionnaire})"))
        return facts

    def _alert(self, alert: AlertLine, report: PatientReport, lang: Lang) -> dict[str, Any]:
        t = TEXTS[lang]
        scale = alert.scale_name.get(lang) if alert.scale_name is not None else (alert.scale or "")
        key = f"alert_{alert.kind}"
        title = t[key].format(scale=scale) if key in t else alert.kind
        since = (
            t["since"].format(date=format_date(alert.since, lang), n=alert.since_number)
            if alert.since_number is not None
            else t["since_date"].format(date=format_date(alert.since, lang))
        )
        if alert.task_status is None:
            task = t["no_task"]
        else:
            task = t["task"].format(status=t.get(f"task_{alert.task_status}", alert.task_status))
            if alert.task_owner:
                task += ", " + t["task_owner"].format(owner=alert.task_owner)
        return {
            "title": title,
            "since": since,
            "urgent": alert.urgent,
            "cleared": alert.status != "active",
            "task": task,
            "kind": alert.kind,
        }

    def _summary(self, report: PatientReport, lang: Lang) -> list[str]:
        t = TEXTS[lang]
        c = report.change
        out: list[str] = []

        def names(lines: tuple[ChangeLine, ...], kind: str) -> str:
            return join_names([line.name.get(lang) for line in lines if line.kind == kind], lang)

        for key, lines, kind in (
            ("sum_prev_worse", c.since_previous, "deterioration"),
            ("sum_first_worse", c.since_first, "deterioration"),
            ("sum_prev_better", c.since_previous, "improvement"),
            ("sum_first_better", c.since_first, "improvement"),
            ("sum_trend_worse", c.trends, "deterioration"),
            ("sum_trend_better", c.trends, "improvement"),
        ):
            if found := names(lines, kind):
                out.append(t[key].format(names=found))
        if not c.since_first and not c.since_previous:
            out.insert(0, t["sum_none"])
        stagnating = [s.get(lang) if isinstance(s, Text) else s.name.get(lang) for s in c.stagnating]
        if stagnating:
            out.append(t["sum_stagnation"].format(names=join_names(stagnating, lang)))
        elevated = [e.get(lang) for e in c.elevated]
        out.append(
            t["sum_elevated"].format(names=join_names(elevated, lang)) if elevated else t["sum_none_elevated"]
        )
        return out

    def _alliance(self, report: PatientReport, lang: Lang, words: ChartWords) -> dict[str, Any]:
        t = TEXTS[lang]
        a = report.alliance
        names = {b.code: b.name.get(lang) for b in a.bars}
        parts = []
        rows = []
        for bar in a.bars:
            now = DASH if bar.percent is None else format_percent(bar.percent, lang)
            prev = None if bar.previous is None else format_percent(bar.previous, lang)
            parts.append(
                t["alliance_part"].format(
                    name=names[bar.code],
                    now=now,
                    prev="" if prev is None else t["alliance_part_prev"].format(prev=prev),
                )
            )
            rows.append({"name": names[bar.code], "now": now, "previous": prev or DASH})
        reasons = []
        if a.below_floor and a.floor_percent is not None:
            reasons.append(t["alliance_below_floor"].format(floor=format_number(a.floor_percent, lang, 0)))
        if a.reliable_drop:
            reasons.append(t["alliance_drop"])
        status = (
            t["alliance_rupture"].format(reasons=join_names(reasons, lang)) if a.rupture else t["alliance_ok"]
        )
        has_data = any(b.percent is not None or b.previous is not None for b in a.bars)
        return {
            "intro": t["alliance_intro"].format(
                prev="" if a.previous_number is None else t["alliance_prev"].format(n=a.previous_number)
            ),
            "chart": Markup(alliance_svg(a, names, words)) if has_data else None,  # our own SVG
            "label": t["alliance_label"].format(parts="; ".join(parts)) + ". " + status,
            "rows": rows,
            "rupture": a.rupture,
            "status": status,
        }

    def _trajectory(
        self, tr: Trajectory, report: PatientReport, lang: Lang, words: ChartWords
    ) -> dict[str, Any]:
        t = TEXTS[lang]
        name = tr.name.get(lang)
        points = "; ".join(
            t["chart_point"].format(
                n=p.number,
                score=format_number(p.score, lang, 2),
                kind="" if p.full else t["chart_trigger"],
                change={"deterioration": t["chart_worse"], "improvement": t["chart_better"]}.get(
                    p.change or "", ""
                ),
            )
            for p in tr.points
        )
        latest = DASH if tr.latest is None else format_number(tr.latest, lang, 2)
        label = t["chart_label"].format(
            name=name,
            latest=latest,
            n=report.header.number,
            low=format_number(tr.elevated_low, lang, 2),
            high=format_number(tr.elevated_high, lang, 0),
            norm=format_number(tr.norm_mean, lang, 2),
            points=points,
        )
        if tr.stagnation:
            label += " " + t["stagnation"]
        expected = None
        by_number: dict[int, str] = {}
        if tr.expected is not None:
            curve = tr.expected
            lo, hi = curve.percentiles
            expected = t["expected_caption"].format(
                intake=format_number(curve.intake, lang, 2),
                lo=lo,
                hi=hi,
                episodes=curve.n_episodes,
                patients=curve.n_patients,
                date=format_date(curve.fitted, lang),
            )
            label += " " + expected
            for k, mid, low, high in curve.points:
                band = f"{format_number(low, lang, 2)} {DASH} {format_number(high, lang, 2)}"
                by_number[k] = f"{format_number(mid, lang, 2)} ({band})"
        return {
            "code": tr.code,
            "name": name,
            "svg": Markup(trajectory_svg(tr, words)),  # vl-convert's SVG of our own spec
            "label": label,
            "latest": t["not_scored"] if tr.latest is None else t["latest"].format(score=latest),
            "stagnation": tr.stagnation,
            "expected": expected,
            "rows": [
                {
                    "expected": by_number.get(p.number, ""),
                    "n": p.number,
                    "date": format_date(p.date, lang),
                    "score": format_number(p.score, lang, 2),
                    "asked": t["asked_full"] if p.full else t["asked_trigger"],
                    "change": "" if p.change is None else t[f"change_{p.change}"],
                }
                for p in tr.points
            ],
        }

    # ------------------------------------------------------------------ caseload
    def caseload_html(
        self,
        rows: list[CaseloadRow],
        lang: Lang,
        *,
        clinician_name: str,
        report_url: Callable[[str], str],
        other_lang_url: str | None,
    ) -> str:
        """The clinician's patients, one row each, each opening the report."""
        t = TEXTS[lang]
        short: Mapping[str, str] = ALERT_SHORT[lang]
        view = [
            {
                "name": r.name or r.patient_id,
                "url": report_url(r.patient_id),
                "born": "" if r.birth_date is None else format_date(r.birth_date, lang),
                "alerts": [short.get(k, k) for k in r.open_alerts],
                "stagnating": join_names([s.get(lang) for s in r.stagnating], lang),
                "deteriorating": join_names([s.get(lang) for s in r.deteriorating], lang),
                "last": t["never"] if r.last_response is None else format_date(r.last_response, lang),
                "open": r.open_tasks,
                "overdue": r.overdue_tasks,
            }
            for r in rows
        ]
        return self.env.get_template("caseload.html").render(
            lang=lang,
            t=t,
            pdf=False,
            stylesheet_url=self.stylesheet_url,
            other_lang_url=other_lang_url,
            other_lang="en" if lang == "nb" else "nb",
            title=t["caseload_title"],
            caption=t["caseload_caption"].format(name=clinician_name),
            rows=view,
        )
