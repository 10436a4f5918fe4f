"""The report's own wording in bokmål and English (the content's texts, scale names and items, come
with the report itself), and the few formatting rules that belong to a language (dates, numbers)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from typing import Literal

from fhir_norse.messaging.templates import MONTHS

Lang = Literal["nb", "en"]


TEXTS: Mapping[str, Mapping[str, str]] = {
    "nb": {
        "site": "Tilbakemeldingsrapport",
        "skip": "Gå til innholdet",
        "language_switch": "English",
        "report_title": "Tilbakemeldingsrapport for {name}",
        "born": "Født",
        "episode": "Behandlingsforløp",
        "administration": "Rapport {n} av {of}",
        "answered": "Besvart",
        "context": "Tidspunkt",
        "instrument": "Skjema",
        "pdf": "Last ned som PDF",
        "all_scales": "Vis alle skalaer",
        "nav": "Rapportvalg",
        "alerts": "Varsler",
        "no_alerts": "Ingen aktive varsler ved denne rapporten.",
        "since": "siden {date} (rapport {n})",
        "since_date": "siden {date}",
        "flag_cleared": "Varselet er avsluttet senere.",
        "task": "Oppgave: {status}",
        "task_owner": "ansvarlig: {owner}",
        "no_task": "Ingen oppgave.",
        "urgent": "Haster",
        "prefer_not": (
            "Pasienten valgte «vil ikke svare» på spørsmål om selvmordstanker. Spør om dette i timen."
        ),
        "summary": "Endring i korte trekk",
        "alliance": "Samarbeidet (allianse)",
        "alliance_intro": (
            "Prosent av høyeste mulige skår. Heltrukne søyler: nå. Stiplede: forrige rapport{prev}."
        ),
        "alliance_prev": " (rapport {n})",
        "alliance_rupture": "Brudd i samarbeidet: {reasons}.",
        "alliance_below_floor": "totalen er under {floor} %",
        "alliance_drop": "totalen er pålitelig lavere enn forrige gang",
        "alliance_ok": "Ingen tegn til brudd i samarbeidet.",
        "alliance_label": "Allianse i prosent av maksimum. {parts}",
        "alliance_part": "{name}: {now}{prev}",
        "alliance_part_prev": " (forrige {prev})",
        "dimension": "Dimensjon",
        "now": "Nå",
        "previous": "Forrige",
        "floor": "grense",
        "rupture": "Brudd",
        "preferences": "Ønsker for behandlingen",
        "pref_more": "Mer",
        "pref_less": "Mindre",
        "pref_as_now": "Som nå",
        "pref_none": "Ikke besvart",
        "pref_changed": "sist endret ved rapport {n} ({date})",
        "pref_never": "aldri besvart",
        "trajectories": "Skalaer over tid",
        "elevated_short": "Forhøyet",
        "legend": "Tegnforklaring",
        "legend_full": "fylt sirkel: besvart i sin helhet",
        "legend_trigger": "hul firkant: bare innledende spørsmål (skalaen var lukket)",
        "legend_worse": "▲ over punktet: pålitelig forverring siden forrige rapport",
        "legend_better": "▼ under punktet: pålitelig bedring siden forrige rapport",
        "legend_band": "skravert felt øverst: forhøyet område; stiplet linje: normgjennomsnitt",
        "legend_expected": (
            "prikket linje i grått felt: forventet forløp ut fra startskåren, tilpasset på klinikkens egne "
            "avsluttede forløp (der en modell finnes)"
        ),
        "expected_caption": (
            "Forventet forløp for startskår {intake} (grått felt: {lo:g}. til {hi:g}. persentil), "
            "tilpasset på {episodes} forløp hos {patients} pasienter ved denne klinikken, {date}. "
            "Et signal til oppmerksomhet, ikke en diagnose."
        ),
        "col_expected": "Forventet (område)",
        "hidden_scales": "{n} skalaer som aldri er besvart i sin helhet, er ikke vist.",
        "chart_label": (
            "{name}: skår {latest} ved rapport {n}. Forhøyet område fra {low} til {high}. "
            "Normgjennomsnitt {norm}. {points}"
        ),
        "chart_point": "rapport {n}: {score}{kind}{change}",
        "chart_trigger": " (bare innledende spørsmål)",
        "chart_worse": ", pålitelig forverring",
        "chart_better": ", pålitelig bedring",
        "stagnation": "Stagnasjon: forhøyet uten pålitelig endring.",
        "latest": "Nå: {score}",
        "not_scored": "Ikke skåret ved denne rapporten.",
        "table_caption": "Skårer for {name}",
        "col_report": "Rapport",
        "col_date": "Dato",
        "col_score": "Skår",
        "col_asked": "Spurt",
        "col_change": "Pålitelig endring",
        "asked_full": "i sin helhet",
        "asked_trigger": "bare innledende",
        "change_improvement": "bedring",
        "change_deterioration": "forverring",
        "single": "Enkeltspørsmål og medisiner",
        "item": "Spørsmål",
        "answer": "Svar (1\u20137)",
        "not_answered": "Ikke besvart",
        "open_scales": "Svar på åpne skalaer",
        "open_scales_intro": "Svarene ved denne rapporten, spørsmål for spørsmål.",
        "reverse": "(omvendt skåret)",
        "sum_none": "Ingen pålitelig endring siden første eller forrige rapport.",
        "sum_first_worse": "Pålitelig forverring siden første rapport: {names}.",
        "sum_first_better": "Pålitelig bedring siden første rapport: {names}.",
        "sum_prev_worse": "Pålitelig forverring siden forrige rapport: {names}.",
        "sum_prev_better": "Pålitelig bedring siden forrige rapport: {names}.",
        "sum_trend_worse": "Trend mot forverring over alle rapporter (RTI): {names}.",
        "sum_trend_better": "Trend mot bedring over alle rapporter (RTI): {names}.",
        "sum_stagnation": "Stagnasjon (forhøyet uten pålitelig endring): {names}.",
        "sum_elevated": "Forhøyet nå: {names}.",
        "sum_none_elevated": "Ingen skala er forhøyet nå.",
        "intake": "Inntak",
        "weekly": "Underveis",
        "termination": "Avslutning",
        "alert_suicide-risk": "Selvmordsrisiko",
        "alert_deterioration": "Pålitelig forverring: {scale}",
        "alert_alliance-rupture": "Brudd i samarbeidet",
        "alert_prefer-not-suicide": "«Vil ikke svare» på selvmordstanker",
        "alert_not-on-track": "Ikke i rute (dårligere forløp enn forventet ut fra startnivået): {scale}",
        "task_requested": "ikke påbegynt",
        "task_received": "mottatt",
        "task_accepted": "akseptert",
        "task_ready": "klar",
        "task_in-progress": "pågår",
        "task_on-hold": "satt på vent",
        "task_completed": "fullført",
        "task_cancelled": "avlyst",
        "task_failed": "ikke utført",
        # caseload
        "caseload_title": "Mine pasienter",
        "caseload_intro": (
            "Pasienter med aktive varsler først, så stagnasjon, så forverring, så etter siste svar."
        ),
        "caseload_caption": "Pasientene til {name}",
        "col_patient": "Pasient",
        "col_born": "Født",
        "col_alerts": "Aktive varsler",
        "col_stagnating": "Stagnasjon",
        "col_deteriorating": "Forverring",
        "col_last": "Siste svar",
        "col_open": "Åpne oppgaver",
        "col_overdue": "Forfalte",
        "none": "Ingen",
        "never": "Aldri",
        "no_patients": "Ingen pasienter i behandlingsteamene dine.",
        "open_report": "Åpne rapporten for {name}",
    },
    "en": {
        "site": "Feedback report",
        "skip": "Skip to content",
        "language_switch": "Norsk",
        "report_title": "Feedback report for {name}",
        "born": "Born",
        "episode": "Episode of care",
        "administration": "Report {n} of {of}",
        "answered": "Answered",
        "context": "Context",
        "instrument": "Questionnaire",
        "pdf": "Download as PDF",
        "all_scales": "Show all scales",
        "nav": "Report options",
        "alerts": "Alerts",
        "no_alerts": "No active alerts at this report.",
        "since": "since {date} (report {n})",
        "since_date": "since {date}",
        "flag_cleared": "The alert has cleared since.",
        "task": "Task: {status}",
        "task_owner": "owner: {owner}",
        "no_task": "No task.",
        "urgent": "Urgent",
        "prefer_not": (
            "The patient chose 'prefer not to answer' on questions about suicidal thoughts. "
            "Ask about it in the session."
        ),
        "summary": "Change at a glance",
        "alliance": "Working alliance",
        "alliance_intro": (
            "Percent of the highest possible score. Solid bars: now. Dashed: previous report{prev}."
        ),
        "alliance_prev": " (report {n})",
        "alliance_rupture": "Alliance rupture: {reasons}.",
        "alliance_below_floor": "the total is below {floor} %",
        "alliance_drop": "the total is reliably lower than last time",
        "alliance_ok": "No sign of an alliance rupture.",
        "alliance_label": "Alliance as percent of the maximum. {parts}",
        "alliance_part": "{name}: {now}{prev}",
        "alliance_part_prev": " (previous {prev})",
        "dimension": "Dimension",
        "now": "Now",
        "previous": "Previous",
        "floor": "floor",
        "rupture": "Rupture",
        "preferences": "Wishes for the therapy",
        "pref_more": "More",
        "pref_less": "Less",
        "pref_as_now": "As now",
        "pref_none": "Not answered",
        "pref_changed": "last changed at report {n} ({date})",
        "pref_never": "never answered",
        "trajectories": "Scales over time",
        "elevated_short": "Elevated",
        "legend": "Key",
        "legend_full": "filled circle: asked in full",
        "legend_trigger": "hollow square: opening question only (the scale was closed)",
        "legend_worse": "▲ above a point: reliable deterioration since the previous report",
        "legend_better": "▼ below a point: reliable improvement since the previous report",
        "legend_band": "shaded band at the top: elevated range; dashed line: norm mean",
        "legend_expected": (
            "dotted line in a grey band: the expected course for the intake score, fitted on this clinic's "
            "own finished episodes (where a model exists)"
        ),
        "expected_caption": (
            "Expected course for an intake score of {intake} (grey band: {lo:g}th-{hi:g}th percentile), "
            "fitted on {episodes} episodes of {patients} patients at this clinic, {date}. A signal for "
            "attention, not a diagnosis."
        ),
        "col_expected": "Expected (range)",
        "hidden_scales": "{n} scales never asked in full are not shown.",
        "chart_label": (
            "{name}: score {latest} at report {n}. Elevated range {low} to {high}. Norm mean {norm}. {points}"
        ),
        "chart_point": "report {n}: {score}{kind}{change}",
        "chart_trigger": " (opening question only)",
        "chart_worse": ", reliable deterioration",
        "chart_better": ", reliable improvement",
        "stagnation": "Stagnation: elevated without reliable change.",
        "latest": "Now: {score}",
        "not_scored": "Not scored at this report.",
        "table_caption": "Scores of {name}",
        "col_report": "Report",
        "col_date": "Date",
        "col_score": "Score",
        "col_asked": "Asked",
        "col_change": "Reliable change",
        "asked_full": "in full",
        "asked_trigger": "opening question only",
        "change_improvement": "improvement",
        "change_deterioration": "deterioration",
        "single": "Single items and medication",
        "item": "Question",
        "answer": "Answer (1\u20137)",
        "not_answered": "Not answered",
        "open_scales": "Answers on open scales",
        "open_scales_intro": "The answers at this report, item by item.",
        "reverse": "(reverse-scored)",
        "sum_none": "No reliable change since the first or the previous report.",
        "sum_first_worse": "Reliable deterioration since the first report: {names}.",
        "sum_first_better": "Reliable improvement since the first report: {names}.",
        "sum_prev_worse": "Reliable deterioration since the previous report: {names}.",
        "sum_prev_better": "Reliable improvement since the previous report: {names}.",
        "sum_trend_worse": "Trend towards deterioration over all reports (RTI): {names}.",
        "sum_trend_better": "Trend towards improvement over all reports (RTI): {names}.",
        "sum_stagnation": "Stagnation (elevated without reliable change): {names}.",
        "sum_elevated": "Elevated now: {names}.",
        "sum_none_elevated": "No scale is elevated now.",
        "intake": "Intake",
        "weekly": "During treatment",
        "termination": "Termination",
        "alert_suicide-risk": "Suicide risk",
        "alert_deterioration": "Reliable deterioration: {scale}",
        "alert_alliance-rupture": "Alliance rupture",
        "alert_prefer-not-suicide": "'Prefer not to answer' on suicidality",
        "alert_not-on-track": "Not on track (a worse course than expected for the starting point): {scale}",
        "task_requested": "not started",
        "task_received": "received",
        "task_accepted": "accepted",
        "task_ready": "ready",
        "task_in-progress": "in progress",
        "task_on-hold": "on hold",
        "task_completed": "completed",
        "task_cancelled": "cancelled",
        "task_failed": "not done",
        "caseload_title": "My patients",
        "caseload_intro": (
            "Patients with active alerts first, then stagnation, then deterioration, then by the last answer."
        ),
        "caseload_caption": "Patients of {name}",
        "col_patient": "Patient",
        "col_born": "Born",
        "col_alerts": "Active alerts",
        "col_stagnating": "Stagnation",
        "col_deteriorating": "Deterioration",
        "col_last": "Last answer",
        "col_open": "Open tasks",
        "col_overdue": "Overdue",
        "none": "None",
        "never": "Never",
        "no_patients": "No patients in your care teams.",
        "open_report": "Open the report of {name}",
    },
}

# The short names of alert kinds in the caseload (no scale there).
ALERT_SHORT: Mapping[str, Mapping[str, str]] = {
    "nb": {
        "suicide-risk": "Selvmordsrisiko",
        "deterioration": "Forverring",
        "alliance-rupture": "Brudd i samarbeidet",
        "prefer-not-suicide": "«Vil ikke svare» på selvmordstanker",
        "not-on-track": "Ikke i rute",
    },
    "en": {
        "suicide-risk": "Suicide risk",
        "deterioration": "Deterioration",
        "alliance-rupture": "Alliance rupture",
        "prefer-not-suicide": "'Prefer not to answer' on suicidality",
        "not-on-track": "Not on track",
    },
}


def format_date(value: date, lang: Lang) -> str:
    """6.1.2025 in bokmål (dd.mm.yyyy), 6 January 2025 in English."""
    if lang == "en":
        return f"{value.day} {MONTHS['en'][value.month - 1]} {value.year}"
    return value.strftime("%d.%m.%Y")


def format_number(value: float, lang: Lang, digits: int = 1) -> str:
    """A score as a reader of ``lang`` writes it (decimal comma in bokmål)."""
    text = f"{value:.{digits}f}"
    return text.replace(".", ",") if lang == "nb" else text


def format_percent(value: float, lang: Lang) -> str:
    return f"{format_number(value, lang, 0)} %"


def join_names(names: list[str], lang: Lang) -> str:
    """A, B and C / A, B og C."""
    if len(names) <= 1:
        return "".join(names)
    last = " og " if lang == "nb" else " and "
    return ", ".join(names[:-1]) + last + names[-1]
