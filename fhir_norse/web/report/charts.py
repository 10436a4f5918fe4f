"""The report's charts: Vega-Altair specifications rendered to SVG on the server by vl-convert.

Why server-side SVG: the page needs no JavaScript (its Content-Security-Policy allows none), it prints
as it looks, and WeasyPrint draws the very same SVG into the PDF. Nothing here draws geometry by hand:
each chart is a declarative Vega-Lite spec (https://vega.github.io/vega-lite/docs/) built with Altair
(https://altair-viz.github.io/) and compiled and rendered by vl-convert (the Vega renderer in a
library, no browser, https://github.com/vega/vl-convert).

Meaning never rides on colour alone (WCAG 2.2, 1.4.1 Use of Color):

* trajectory: full administrations are filled circles, trigger-only (closed) ones hollow squares; a
  reliable deterioration since the previous administration is an upward triangle above the point, a
  reliable improvement a downward triangle below it; the elevated range is shaded *and* labelled in the
  plot; the norm mean is a dashed rule with a label; the expected-recovery course (issue 19), when the
  mapping has a model, is a dotted line from the intake with its tolerance band hatched in grey behind
  the patient's line, and labelled "expected" at its end;
* alliance: this administration's bars are solid, the previous one's outlined, each labelled with its
  percent; the floor is a labelled dashed rule; a rupture is a warning triangle and the word beside the
  total.

Every chart is returned with the words its text alternative needs: the page wraps it in a ``figure``
with ``role="img"``, an ``aria-label`` and a visually hidden data table (pages.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import altair as alt

from fhir_norse.rom.report import AllianceReport, Trajectory

__all__ = ["ChartWords", "alliance_svg", "trajectory_svg"]

# High-contrast, colour-blind-safe (Okabe-Ito) colours; the shapes carry the meaning on their own.
INK = "#1a1a1a"
LINE = "#0b5394"
ELEVATED_FILL = "#f4c7a1"
ELEVATED_TEXT = "#7a3300"
NORM = "#555555"
EXPECTED = "#6b6b6b"
EXPECTED_FILL = "#d9d9d9"
# Score points between the expected course's end and the norm line under which their labels would touch.
_LABEL_CLEARANCE = 0.6
DETERIORATION = "#b3261e"
IMPROVEMENT = "#1b6e3a"
PREVIOUS = "#ffffff"
FONT = "DejaVu Sans"


@dataclass(frozen=True, slots=True)
class ChartWords:
    """The words drawn inside the charts, in the page's language."""

    administration: str
    score: str
    elevated: str
    norm: str
    percent: str
    now: str
    previous: str
    floor: str
    rupture: str
    expected: str = "expected"


# Vega's ARIA on mark containers, which ``aria: false`` does not remove from every group.
_ARIA = re.compile(r' (?:role|aria-roledescription|aria-label|aria-hidden)="[^"]*"')


def _data(values: list[dict[str, Any]]) -> Any:
    """Inline data of a chart (Altair's constructors are untyped)."""
    import altair as alt

    return alt.Data(values=values)  # type: ignore[no-untyped-call]


def _render(chart: alt.TopLevelMixin) -> str:
    """The chart as SVG text, hidden from assistive technology: the page names it once (role="img"
    with an aria-label, and a data table), so nothing inside it may be an unnamed image of its own."""
    import vl_convert  # Altair and vl-convert are imported on first use: they take 0.4 s to load

    svg = _ARIA.sub("", str(vl_convert.vegalite_to_svg(chart.to_dict())))
    # The root <svg> is made scalable by the style sheet; its fixed size stays as the intrinsic size.
    return svg.replace("<svg ", '<svg aria-hidden="true" focusable="false" ', 1)


def _config(chart: Any) -> Any:
    return (
        # No ARIA inside the SVG: the page gives each chart one text alternative (role="img" around it),
        # and Vega's per-mark roles would be unnamed images inside that image (axe: svg-img-alt).
        chart.configure(font=FONT, aria=False)
        .configure_view(stroke=None)
        .configure_axis(
            aria=False,
            labelColor=INK,
            titleColor=INK,
            labelFontSize=11,
            titleFontSize=11,
            gridColor="#e3e3e3",
        )
    )


def trajectory_svg(trajectory: Trajectory, words: ChartWords, *, width: int = 300, height: int = 150) -> str:
    """One scale over its administrations (module doc)."""
    import altair as alt

    low, high = trajectory.elevated_low, trajectory.elevated_high
    points = [
        {
            "n": p.number,
            "score": p.score,
            "full": p.full,
            "marker": None
            if p.change is None
            else min(p.score + 0.6, trajectory.scale_max + 0.4)
            if p.change == "deterioration"
            else max(p.score - 0.6, trajectory.scale_min - 0.4),
            "change": p.change,
        }
        for p in trajectory.points
    ]
    numbers = [p.number for p in trajectory.points]
    x_scale = alt.Scale(domain=[min(numbers) - 0.5, max(numbers) + 0.5], nice=False, zero=False)
    y_scale = alt.Scale(domain=[trajectory.scale_min - 0.5, trajectory.scale_max + 0.5], nice=False)
    x_axis = alt.Axis(title=words.administration, tickMinStep=1, format="d", grid=False)
    y_axis = alt.Axis(title=words.score, values=list(range(trajectory.scale_min, trajectory.scale_max + 1)))
    data = _data(points)
    band = (
        alt.Chart(_data([{"low": low, "high": high + 0.5}]))
        .mark_rect(color=ELEVATED_FILL, opacity=0.7)
        .encode(y=alt.Y("low:Q", scale=y_scale, axis=y_axis), y2="high:Q")
    )
    band_label = (
        alt.Chart(_data([{"y": high + 0.2, "label": words.elevated}]))
        .mark_text(align="left", baseline="top", dx=4, fontSize=10, color=ELEVATED_TEXT, fontWeight="bold")
        .encode(y=alt.Y("y:Q", scale=y_scale), x=alt.value(0), text="label:N")
    )
    norm = (
        alt.Chart(_data([{"mean": trajectory.norm_mean, "label": words.norm}]))
        .mark_rule(color=NORM, strokeDash=[5, 3], strokeWidth=1.2)
        .encode(y=alt.Y("mean:Q", scale=y_scale))
    )
    norm_label = (
        alt.Chart(_data([{"mean": trajectory.norm_mean, "label": words.norm}]))
        .mark_text(align="right", baseline="bottom", dy=-2, fontSize=9, color=NORM)
        .encode(y=alt.Y("mean:Q", scale=y_scale), x=alt.value(width), text="label:N")
    )
    x = alt.X("n:Q", scale=x_scale, axis=x_axis)
    behind: list[Any] = []
    if trajectory.expected is not None:
        curve = trajectory.expected
        rows = [{"n": 1, "mid": curve.intake, "low": curve.intake, "high": curve.intake}] + [
            {
                "n": k,
                "mid": mid,
                "low": max(lo, trajectory.scale_min - 0.5),
                "high": min(hi, trajectory.scale_max + 0.5),
            }
            for k, mid, lo, hi in curve.points
            if k <= max(numbers)
        ]
        expected_data = _data(rows)
        behind = [
            alt.Chart(expected_data)
            .mark_area(color=EXPECTED_FILL, opacity=0.6)
            .encode(x=x, y=alt.Y("low:Q", scale=y_scale), y2="high:Q"),
            alt.Chart(expected_data)
            .mark_line(color=EXPECTED, strokeDash=[2, 2], strokeWidth=1.5)
            .encode(x=x, y=alt.Y("mid:Q", scale=y_scale)),
            _expected_label(rows[-1], trajectory.norm_mean, words.expected, x, y_scale),
        ]
    line = alt.Chart(data).mark_line(color=LINE, strokeWidth=2).encode(x=x, y=alt.Y("score:Q", scale=y_scale))
    full = (
        alt.Chart(data)
        .transform_filter("datum.full")
        .mark_point(shape="circle", filled=True, size=60, color=LINE, stroke=INK, strokeWidth=1)
        .encode(x=x, y=alt.Y("score:Q", scale=y_scale))
    )
    trigger_only = (
        alt.Chart(data)
        .transform_filter("!datum.full")
        .mark_point(shape="square", filled=True, size=55, fill=PREVIOUS, stroke=LINE, strokeWidth=2)
        .encode(x=x, y=alt.Y("score:Q", scale=y_scale))
    )
    worse = (
        alt.Chart(data)
        .transform_filter("datum.change === 'deterioration'")
        .mark_point(
            shape="triangle-up", filled=True, size=90, color=DETERIORATION, stroke=INK, strokeWidth=0.8
        )
        .encode(x=x, y=alt.Y("marker:Q", scale=y_scale))
    )
    better = (
        alt.Chart(data)
        .transform_filter("datum.change === 'improvement'")
        .mark_point(
            shape="triangle-down", filled=True, size=90, color=IMPROVEMENT, stroke=INK, strokeWidth=0.8
        )
        .encode(x=x, y=alt.Y("marker:Q", scale=y_scale))
    )
    chart = alt.layer(
        band, band_label, norm, norm_label, *behind, line, full, trigger_only, worse, better
    ).properties(width=width, height=height)
    return _render(_config(chart))


def alliance_svg(
    alliance: AllianceReport, names: Mapping[str, str], words: ChartWords, *, width: int = 300
) -> str:
    """Alliance bars: percent of the maximum per dimension, this administration beside the previous."""
    import altair as alt

    rows: list[dict[str, Any]] = []
    for bar in alliance.bars:
        for when, value in ((words.now, bar.percent), (words.previous, bar.previous)):
            if value is not None:
                rows.append(
                    {"dim": names[bar.code], "when": when, "percent": value, "label": f"{value:.0f} %"}
                )
    order = [names[b.code] for b in alliance.bars]
    when_order = [words.now, words.previous]
    y = alt.Y("dim:N", sort=order, title=None, axis=alt.Axis(labelFontSize=12, labelFontWeight="bold"))
    offset = alt.YOffset("when:N", sort=when_order, scale=alt.Scale(domain=when_order))
    x_scale = alt.Scale(domain=[0, 118])
    x = alt.X("percent:Q", scale=x_scale, axis=alt.Axis(title=words.percent, values=[0, 25, 50, 75, 100]))
    data = _data(rows)
    now = (
        alt.Chart(data)
        .transform_filter(alt.datum.when == words.now)
        .mark_bar(color=LINE, stroke=INK, strokeWidth=1, height=13)
        .encode(y=y, yOffset=offset, x=x)
    )
    before = (
        alt.Chart(data)
        .transform_filter(alt.datum.when == words.previous)
        .mark_bar(color=PREVIOUS, stroke=INK, strokeWidth=1.2, strokeDash=[3, 2], height=13)
        .encode(y=y, yOffset=offset, x=x)
    )
    labels = (
        alt.Chart(data)
        .mark_text(align="left", dx=3, fontSize=10, color=INK)
        .encode(y=y, yOffset=offset, x=x, text=alt.Text("label:N"))
    )
    layers: list[Any] = [now, before, labels]
    if alliance.floor_percent is not None:
        layers.append(
            alt.Chart(_data([{"floor": alliance.floor_percent}]))
            .mark_rule(color=DETERIORATION, strokeDash=[6, 3], strokeWidth=1.5)
            .encode(x=alt.X("floor:Q", scale=x_scale))
        )
        layers.append(
            alt.Chart(_data([{"floor": alliance.floor_percent, "label": words.floor}]))
            .mark_text(align="center", baseline="bottom", dy=-2, fontSize=9, color=DETERIORATION)
            .encode(x=alt.X("floor:Q", scale=x_scale), y=alt.value(0), text="label:N")
        )
    total = names[alliance.bars[-1].code]
    if alliance.rupture:
        mark = [{"dim": total, "x": 112, "label": words.rupture}]
        layers.append(
            alt.Chart(_data(mark))
            .mark_point(shape="triangle-up", filled=True, size=160, color=DETERIORATION, stroke=INK)
            .encode(y=y, x=alt.X("x:Q", scale=x_scale))
        )
        layers.append(
            alt.Chart(_data(mark))
            .mark_text(align="right", dx=-10, fontSize=11, fontWeight="bold", color=DETERIORATION)
            .encode(y=y, x=alt.X("x:Q", scale=x_scale), text="label:N")
        )
    chart = alt.layer(*layers).properties(width=width, height=alt.Step(15))
    return _render(_config(chart))


def _expected_label(end: dict[str, float], norm_mean: float, text: str, x: Any, y_scale: Any) -> Any:
    """ "expected" at the end of the expected course; where that end is near the norm line (whose label
    sits just above the line at the right edge), under the norm line instead, so the two never overlap."""
    import altair as alt

    near = abs(end["mid"] - norm_mean) < _LABEL_CLEARANCE
    row = {**end, "mid": min(end["mid"], norm_mean) if near else end["mid"], "label": text}
    return (
        alt.Chart(_data([row]))
        .mark_text(
            align="left",
            baseline="top" if near else "middle",
            dx=4,
            dy=3 if near else 0,
            fontSize=9,
            color=EXPECTED,
        )
        .encode(x=x, y=alt.Y("mid:Q", scale=y_scale), text="label:N")
    )
