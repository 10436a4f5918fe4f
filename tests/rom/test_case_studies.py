"""Sonja and Harald from the Norse Feedback case study, end to end over HTTP on both databases.

Each patient answers the static NF 2.1 Questionnaire once per feedback report (increasing ``authored``);
the responses are POSTed to a real server and everything is read back the way an EHR would: FHIR
searches for the scale, alliance and preference Observations, the alert Flags and the DiagnosticReports.

The answer levels follow the stories in ``../shared/domain/README.md`` ("Two patients from the case
study") and ``../shared/seed/case-study-norse-feedback.txt``. What the server should make of them is
computed here independently, from the documented rules and the mapping's numbers (norm SD, reliability,
critical value, stagnation window, the elevated range (score >= elevated_from, by default the closing
threshold; issue 13), the alliance floor):

* RC = (x2 - x1) / (sqrt(2) * SD * sqrt(1 - r)); RTI = b1 / (SD * sqrt(1 - r) * sqrt(12 / (n (n^2 - 1))))
  over the n administrations so far; reliable when |index| > critical.
* Stagnation: the last ``stagnation_window`` scores are all in the elevated range and neither the RC over
  that window nor its RTI is reliable.
* ``deterioration/<scale>``: reliable deterioration since the previous administration.
  ``alliance-rupture``: total below the floor (percent of the maximum raw score) or reliably lower than
  last time. A Flag lives while its condition holds; when it clears the Flag becomes inactive with
  ``period.end``, and a later episode is a new Flag.

Besides that generic oracle, each test pins the story's milestones as literal report numbers (Sonja's
rupture at report 3 cleared at 9, stagnation from report 4/5/6, deterioration at 13; Harald's rupture
cleared at 18 and raised again at 21 ...), so a change of the mapping's numbers that breaks the story
fails loudly instead of silently moving the milestones.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import date, timedelta
from fractions import Fraction
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhir_norse.api.app import create_app
from fhir_norse.config import Settings
from fhir_norse.instruments.schema import InstrumentMapping
from fhir_norse.rom.demo.scenarios import Report, answers_for, case_study
from tests.intake_support import (
    NF21_STATIC,
    create_patient,
    nf21,
    post_response,
    publish_questionnaires,
    response,
    search,
)
from tests.tokens import bearer

Json = dict[str, Any]

# The wire contract an EHR codes against (written out, not imported from the server).
BASE = "http://fhir-norse.org/fhir"
CS_SCALES = f"{BASE}/CodeSystem/nf21-scales"
CS_ALLIANCE = f"{BASE}/CodeSystem/nf21-alliance"
CS_ITEMS = f"{BASE}/CodeSystem/nf21-items"
CS_PREFERENCE = f"{BASE}/CodeSystem/preference-values"
CS_COMPONENTS = f"{BASE}/CodeSystem/rom-components"
CS_INTERPRETATION = f"{BASE}/CodeSystem/rom-interpretation"
ALERT_KEY = f"{BASE}/alert-key"
RUPTURE = "alliance-rupture"

# alliance code -> positions in Report.alliance (goal, bond-1, bond-2, task)
ALLIANCE_PARTS: dict[str, tuple[int, ...]] = {
    "goal": (0,),
    "bond": (1, 2),
    "task": (3,),
    "total": (0, 1, 2, 3),
}
# --- the scenario model (Report, answers_for: fhir_norse.rom.demo.scenarios) -------------------------


def reported(total: int, count: int) -> float:
    """The mean ``total / count`` as the instrument reports it: 2 decimals, rounded half up."""
    return math.floor(Fraction(total, count) * 100 + Fraction(1, 2)) / 100


def scale_score(values: tuple[int, ...]) -> float:
    """Mean of the answered items (problem direction); the trigger alone when the scale is closed."""
    return reported(sum(values), len(values))


def alliance_mean(report: Report, code: str) -> float:
    parts = [report.alliance[i] for i in ALLIANCE_PARTS[code]]
    return reported(sum(parts), len(parts))


def alliance_percent(report: Report, code: str) -> float:
    parts = [report.alliance[i] for i in ALLIANCE_PARTS[code]]
    return sum(parts) / (7 * len(parts)) * 100


# --- the independent oracle (README formulas) ------------------------------------------------------


def s_diff(sd: float, r: float) -> float:
    return math.sqrt(2) * sd * math.sqrt(1 - r)


def rc(x1: float, x2: float, sd: float, r: float) -> float:
    return (x2 - x1) / s_diff(sd, r)


def rti(series: Sequence[float], sd: float, r: float) -> float:
    """McAleavey's RTI over equally spaced administrations, exactly as the README writes it."""
    n = len(series)
    x_mean = (n - 1) / 2
    y_mean = sum(series) / n
    b1 = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(series)) / sum(
        (i - x_mean) ** 2 for i in range(n)
    )
    return b1 / (sd * math.sqrt(1 - r) * math.sqrt(12 / (n * (n * n - 1))))


def change_class(index: float, critical: float, higher_is_worse: bool = True) -> str:
    if abs(index) <= critical:
        return "no-reliable-change"
    worse = index > 0 if higher_is_worse else index < 0
    return "reliable-deterioration" if worse else "reliable-improvement"


@dataclass(frozen=True)
class Expected:
    """What one scale (or alliance) Observation should carry at one administration."""

    score: float
    rc_first: float | None
    rc_previous: float | None
    rti: float | None
    first: str | None
    previous: str | None
    elevated: bool
    stagnation: bool


def expected_series(
    series: Sequence[float],
    *,
    sd: float,
    r: float,
    cutoff: float,
    critical: float,
    window: int,
    worse_up: bool,
) -> list[Expected]:
    out: list[Expected] = []
    for n in range(1, len(series) + 1):
        xs = series[:n]
        now = xs[-1]
        rc_first = rc(xs[0], now, sd, r) if n > 1 else None
        rc_previous = rc(xs[-2], now, sd, r) if n > 1 else None
        trend = rti(xs, sd, r) if n > 1 else None
        last = xs[-window:]
        stagnation = (
            n >= window
            and all(x >= cutoff for x in last)
            and abs(rc(last[0], last[-1], sd, r)) <= critical
            and abs(rti(last, sd, r)) <= critical
        )
        out.append(
            Expected(
                score=now,
                rc_first=rc_first,
                rc_previous=rc_previous,
                rti=trend,
                first=None if rc_first is None else change_class(rc_first, critical, worse_up),
                previous=None if rc_previous is None else change_class(rc_previous, critical, worse_up),
                elevated=now >= cutoff,
                stagnation=stagnation,
            )
        )
    return out


def expected_scale(reports: Sequence[Report], code: str, mapping: InstrumentMapping) -> list[Expected]:
    scale = mapping.scale(code)
    return expected_series(
        [scale_score(rep.scales[code]) for rep in reports],
        sd=scale.norms.sd,
        r=scale.reliability.value,
        cutoff=scale.elevated_low,
        critical=mapping.change.critical,
        window=mapping.change.stagnation_window,
        worse_up=True,
    )


def expected_alliance(reports: Sequence[Report], code: str, mapping: InstrumentMapping) -> list[Expected]:
    basis = mapping.alliance.change
    assert basis is not None, "the mapping gives the alliance no SD/reliability: no alliance change"
    return expected_series(
        [alliance_mean(rep, code) for rep in reports],
        sd=basis.sd,
        r=basis.reliability.value,
        cutoff=math.inf,  # the alliance has no elevated range
        critical=mapping.change.critical,
        window=mapping.change.stagnation_window,
        worse_up=False,
    )


def expected_holding(reports: Sequence[Report], mapping: InstrumentMapping) -> list[set[str]]:
    """Per administration, the alert keys whose condition holds (all tracked scales and the alliance
    are scored at every administration, so every condition is evaluated every time)."""
    assert mapping.alerts is not None
    floor = mapping.alerts.alliance_floor_percent
    tracked = sorted({code for rep in reports for code in rep.scales})
    per_scale = {code: expected_scale(reports, code, mapping) for code in tracked}
    total = expected_alliance(reports, "total", mapping)
    out: list[set[str]] = []
    for i, rep in enumerate(reports):
        keys = {f"deterioration/{c}" for c in tracked if per_scale[c][i].previous == "reliable-deterioration"}
        if alliance_percent(rep, "total") < floor or total[i].previous == "reliable-deterioration":
            keys.add(RUPTURE)
        out.append(keys)
    return out


def episodes(holding: Sequence[set[str]], key: str) -> list[tuple[int, int | None]]:
    """(index raised, index cleared or None) for each uninterrupted run of ``key`` holding."""
    out: list[tuple[int, int | None]] = []
    start: int | None = None
    for i, keys in enumerate(holding):
        if key in keys and start is None:
            start = i
        elif key not in keys and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, None))
    return out


# --- reading back over FHIR ---------------------------------------------------------------------------


def first_code(concept: Json) -> tuple[str, str]:
    coding = concept["coding"][0]
    return str(coding["system"]), str(coding["code"])


def component(obs: Json, code: str) -> Json | None:
    found = [c for c in obs.get("component", []) if first_code(c["code"]) == (CS_COMPONENTS, code)]
    assert len(found) <= 1, f"component {code} twice"
    return found[0] if found else None


def quantity(obs: Json, code: str) -> float | None:
    c = component(obs, code)
    return None if c is None else float(c["valueQuantity"]["value"])


def interpretations(obs: Json) -> set[tuple[str, str | None]]:
    """(code, baseline) of the rom-interpretation codes; the baseline is read from the text."""
    out: set[tuple[str, str | None]] = set()
    for concept in obs.get("interpretation", []):
        system, code = first_code(concept)
        if system != CS_INTERPRETATION:
            continue
        text = str(concept.get("text", ""))
        since = "first" if "since the first" in text else "previous" if "since the previous" in text else None
        out.add((code, since))
    return out


# The interpretation codes this test reasons about (others, e.g. trigger-only, are checked apart).
KNOWN = {
    "elevated",
    "within-range",
    "stagnation",
    "reliable-deterioration",
    "reliable-improvement",
    "no-reliable-change",
}


def expected_interpretations(e: Expected, *, with_elevation: bool) -> set[tuple[str, str | None]]:
    out: set[tuple[str, str | None]] = set()
    if with_elevation:
        out.add(("elevated" if e.elevated else "within-range", None))
    if e.first is not None:
        out.add((e.first, "first"))
    if e.previous is not None:
        out.add((e.previous, "previous"))
    if e.stagnation:
        out.add(("stagnation", None))
    return out


def by_effective(resources: Sequence[Json]) -> dict[str, Json]:
    out: dict[str, Json] = {}
    for res in resources:
        when = str(res["effectiveDateTime"])
        assert when not in out, f"two {res['resourceType']} for one administration ({when})"
        out[when] = res
    return out


def alert_key(flag: Json) -> str:
    keys = [i["value"] for i in flag.get("identifier", []) if i.get("system") == ALERT_KEY]
    assert len(keys) == 1, flag
    return str(keys[0])


def flags_by_key(system_client: TestClient, patient: str) -> dict[str, list[Json]]:
    out: dict[str, list[Json]] = {}
    for flag in search(system_client, f"Flag?subject=Patient/{patient}"):
        out.setdefault(alert_key(flag), []).append(flag)
    for flags in out.values():
        flags.sort(key=lambda f: str(f["period"]["start"]))
    return out


def counts(system_client: TestClient, patient: str) -> dict[str, int]:
    return {
        "Observation": len(search(system_client, f"Observation?subject=Patient/{patient}")),
        "Flag": len(search(system_client, f"Flag?subject=Patient/{patient}")),
        "Task": len(search(system_client, f"Task?patient=Patient/{patient}")),
        "DiagnosticReport": len(search(system_client, f"DiagnosticReport?subject=Patient/{patient}")),
        "QuestionnaireResponse": len(
            search(system_client, f"QuestionnaireResponse?subject=Patient/{patient}")
        ),
        "Provenance": len(search(system_client, "Provenance")),
    }


# --- running a scenario ----------------------------------------------------------------------------------


@dataclass
class Run:
    patient: str
    reports: list[Report]
    authored: list[str]
    bodies: list[Json]
    response_ids: list[str]
    # after each POST: alert key -> (Flag id, status) of the patient's Flags
    flag_states: list[dict[str, list[tuple[str, str]]]]

    def index(self, number: int) -> int:
        return next(i for i, rep in enumerate(self.reports) if rep.number == number)

    def at(self, number: int) -> str:
        return self.authored[self.index(number)]


@pytest.fixture
def server(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    publish_questionnaires(app.state.service)
    try:
        with TestClient(app, headers=bearer(app)) as system_client:
            yield system_client
    finally:
        app.state.service.storage.engine.dispose()


def run(system_client: TestClient, name: str, reports: Sequence[Report], start: date, days: int) -> Run:
    """POST one completed response per report (report k authored ``start + (k - 1) * days``)."""
    mapping = nf21()
    numbers = [rep.number for rep in reports]
    assert numbers == sorted(set(numbers)), "reports in increasing order"
    patient = create_patient(system_client, name)
    out = Run(patient, list(reports), [], [], [], [])
    for rep in reports:
        when = (start + timedelta(days=days * (rep.number - 1))).isoformat() + "T08:30:00+01:00"
        body = response(
            NF21_STATIC,
            answers_for(rep, mapping),
            patient=patient,
            authored=when,
            identifier=f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'case-study/{name}/{rep.number}')}",
        )
        answer = post_response(system_client, body)
        assert answer.status_code == 201, answer.text
        out.authored.append(when)
        out.bodies.append(body)
        out.response_ids.append(str(answer.json()["id"]))
        states: dict[str, list[tuple[str, str]]] = {}
        for key, flags in flags_by_key(system_client, patient).items():
            states[key] = [(str(f["id"]), str(f["status"])) for f in flags]
        out.flag_states.append(states)
    return out


# --- shared assertions ---------------------------------------------------------------------------------


def check_scale_observations(system_client: TestClient, run_: Run, code: str) -> list[Json]:
    """Score, RC/RTI components and interpretations of every administration of scale ``code``."""
    mapping = nf21()
    observations = by_effective(
        search(system_client, f"Observation?subject=Patient/{run_.patient}&code={CS_SCALES}|{code}")
    )
    assert sorted(observations) == sorted(run_.authored), code
    expected = expected_scale(run_.reports, code, mapping)
    out: list[Json] = []
    for rep, when, e in zip(run_.reports, run_.authored, expected, strict=True):
        obs = observations[when]
        where = f"{code} at report {rep.number}"
        assert obs["status"] == "final", where
        assert obs["valueQuantity"]["value"] == pytest.approx(e.score), where
        assert quantity(obs, "rc-first") == pytest.approx(e.rc_first), where
        assert quantity(obs, "rc-previous") == pytest.approx(e.rc_previous), where
        assert quantity(obs, "rti") == pytest.approx(e.rti), where
        actual = {i for i in interpretations(obs) if i[0] in KNOWN}
        assert actual == expected_interpretations(e, with_elevation=True), where
        trigger_only = ("trigger-only", None) in interpretations(obs)
        assert trigger_only == (len(rep.scales[code]) == 1), where
        out.append(obs)
    return out


def check_alliance_observations(system_client: TestClient, run_: Run) -> dict[str, dict[str, Json]]:
    mapping = nf21()
    out: dict[str, dict[str, Json]] = {}
    for code in ALLIANCE_PARTS:
        found = by_effective(
            search(system_client, f"Observation?subject=Patient/{run_.patient}&code={CS_ALLIANCE}|{code}")
        )
        assert sorted(found) == sorted(run_.authored), code
        for rep, when, e in zip(
            run_.reports, run_.authored, expected_alliance(run_.reports, code, mapping), strict=True
        ):
            obs = found[when]
            where = f"alliance {code} at report {rep.number}"
            assert obs["valueQuantity"]["value"] == pytest.approx(alliance_mean(rep, code)), where
            assert quantity(obs, "percent-of-max") == pytest.approx(alliance_percent(rep, code)), where
            assert quantity(obs, "rc-first") == pytest.approx(e.rc_first), where
            assert quantity(obs, "rc-previous") == pytest.approx(e.rc_previous), where
            actual = {i for i in interpretations(obs) if i[0] in KNOWN}
            assert actual == expected_interpretations(e, with_elevation=False), where
        out[code] = found
    return out


def check_flags(system_client: TestClient, run_: Run) -> dict[str, list[Json]]:
    """Flags after the run and after every POST follow the holding sequence of the oracle."""
    mapping = nf21()
    holding = expected_holding(run_.reports, mapping)
    # after every POST: the active keys are exactly those that hold, never two active for one key
    for i, (rep, states) in enumerate(zip(run_.reports, run_.flag_states, strict=True)):
        active = {key for key, pairs in states.items() for _fid, status in pairs if status == "active"}
        assert active == holding[i], f"active alerts after report {rep.number}"
        for key, pairs in states.items():
            assert sum(status == "active" for _fid, status in pairs) <= 1, f"{key} active twice"
    # an episode keeps its Flag: the same id from the report that raised it to the one that cleared it
    for key in {k for keys in holding for k in keys}:
        for start, end in episodes(holding, key):
            stop = len(run_.reports) if end is None else end
            ids = {
                fid
                for states in run_.flag_states[start:stop]
                for fid, status in states[key]
                if status == "active"
            }
            assert len(ids) == 1, f"{key}: one Flag per episode, got {ids}"
    # at the end: one Flag per episode, with its period
    flags = flags_by_key(system_client, run_.patient)
    assert set(flags) == {k for keys in holding for k in keys}
    for key, found in flags.items():
        wanted = episodes(holding, key)
        assert len(found) == len(wanted), f"{key}: {len(found)} Flags for {len(wanted)} episodes"
        for flag, (start, end) in zip(found, wanted, strict=True):
            assert flag["period"]["start"] == run_.authored[start], key
            if end is None:
                assert flag["status"] == "active", key
                assert "end" not in flag["period"], key
            else:
                assert flag["status"] == "inactive", key
                assert flag["period"]["end"] == run_.authored[end], key
    return flags


ALERT_NAMES = {RUPTURE: "alliance rupture", "deterioration": "reliable deterioration since last time"}


def check_reports(system_client: TestClient, run_: Run, stagnating: Sequence[str]) -> dict[str, Json]:
    """One DiagnosticReport per administration; its conclusion leads with the alerts that hold and
    names the stagnating scales: ``stagnating`` (the story's) and any other scale the oracle finds
    stagnating (a scale answered at level 2 throughout, in the elevated range of a scale that closes
    below 1.5, stagnates too)."""
    mapping = nf21()
    stagnating = [*stagnating, *(c for c in mapping.display_order if c not in stagnating)]
    holding = expected_holding(run_.reports, mapping)
    reports = by_effective(search(system_client, f"DiagnosticReport?subject=Patient/{run_.patient}"))
    assert sorted(reports) == sorted(run_.authored)
    untracked = [
        replace(
            rep,
            scales={
                **rep.scales,
                **{
                    c: (2,) * len(mapping.scale(c).items)
                    for c in mapping.display_order
                    if c not in rep.scales
                },
            },
        )
        for rep in run_.reports
    ]  # level 2 (answers_for)
    stagnation = {code: expected_scale(untracked, code, mapping) for code in stagnating}
    for i, (rep, when) in enumerate(zip(run_.reports, run_.authored, strict=True)):
        conclusion = str(reports[when]["conclusion"])
        where = f"report {rep.number}: {conclusion}"
        keys = holding[i]
        assert conclusion.startswith("Alert") == bool(keys), where
        for key in keys:
            code, _, scale = key.partition("/")
            assert ALERT_NAMES[code] in conclusion, where
            if scale:
                assert f"{scale}: reliable deterioration" in conclusion, where
        for code, name in ALERT_NAMES.items():
            if not any(k.partition("/")[0] == code for k in keys):
                assert name not in conclusion, where
        names = [mapping.scale(c).name.en for c in stagnating if stagnation[c][i].stagnation]
        if names:
            assert "Stagnation: " in conclusion, where
            listed = conclusion.split("Stagnation: ", 1)[1].split(".", 1)[0].split(", ")
            assert set(listed) == set(names), where
            codes = {first_code(c)[1] for c in reports[when].get("conclusionCode", [])}
            assert "stagnation" in codes, where
        else:
            assert "Stagnation" not in conclusion, where
    return reports


def stagnation_reports(obs: Sequence[Json], run_: Run) -> list[int]:
    return [
        rep.number
        for rep, o in zip(run_.reports, obs, strict=True)
        if ("stagnation", None) in interpretations(o)
    ]


def check_retry(system_client: TestClient, run_: Run, numbers: Sequence[int]) -> None:
    """POSTing a stored response again with its identifier answers 200 and creates nothing."""
    before = counts(system_client, run_.patient)
    flags_before = flags_by_key(system_client, run_.patient)
    for number in numbers:
        i = run_.index(number)
        again = post_response(system_client, run_.bodies[i])
        assert again.status_code == 200, again.text
        assert again.json()["id"] == run_.response_ids[i]
    assert counts(system_client, run_.patient) == before
    assert flags_by_key(system_client, run_.patient) == flags_before


# --- Sonja -------------------------------------------------------------------------------------------------

# The story, report by report: fhir_norse/rom/demo/case-studies.yaml.
SONJA = list(case_study("sonja").reports)


def test_sonja(server: TestClient) -> None:
    system_client = server
    sonja = run(system_client, "Sonja", SONJA, date(2025, 1, 6), 18)
    at = sonja.at

    # Stagnation of the elevated scales, exactly where the rule holds (oracle inside) ...
    internal = check_scale_observations(system_client, sonja, "internal")
    worry = check_scale_observations(system_client, sonja, "worry")
    control = check_scale_observations(system_client, sonja, "control")
    # ... and where the story puts it
    assert stagnation_reports(internal, sonja) == list(range(4, 14))
    assert stagnation_reports(worry, sonja) == list(range(5, 14))
    # Control's elevated range starts at its closing threshold 3.73 (issue 13): the dip to 4 at report 9
    # stays in it, so control stagnates from report 4 on (it was [6, 7, 8, 13] with the opening threshold
    # as the cut-off).
    assert stagnation_reports(control, sonja) == list(range(4, 14))

    # Worsening at the end: reliable deterioration since the previous and the first report
    sad = check_scale_observations(system_client, sonja, "sad")
    hopeless = check_scale_observations(system_client, sonja, "hopeless")
    for observations in (sad, hopeless):
        last = interpretations(observations[-1])
        assert {("reliable-deterioration", "previous"), ("reliable-deterioration", "first")} <= last
        assert ("elevated", None) in last
        for earlier in observations[:-1]:
            assert not any(code == "reliable-deterioration" for code, _ in interpretations(earlier))
    # RC of sad 4 -> 7 with SD 1.68, r 0.8: 3 / (sqrt(2) * 1.68 * sqrt(0.2)) = 2.8235
    assert quantity(sad[-1], "rc-previous") == pytest.approx(2.8235, abs=1e-4)

    # Alliance: percent of the maximum per dimension, low at 3, near the ceiling at 10
    alliance = check_alliance_observations(system_client, sonja)
    percent = {code: quantity(alliance[code][at(3)], "percent-of-max") for code in ALLIANCE_PARTS}
    assert percent == pytest.approx({"goal": 300 / 7, "bond": 50.0, "task": 200 / 7, "total": 300 / 7})
    assert quantity(alliance["total"][at(2)], "percent-of-max") == pytest.approx(75.0)
    assert quantity(alliance["total"][at(9)], "percent-of-max") == pytest.approx(600 / 7)
    assert quantity(alliance["total"][at(10)], "percent-of-max") == pytest.approx(2700 / 28)
    assert ("reliable-deterioration", "previous") in interpretations(alliance["total"][at(3)])
    assert ("reliable-improvement", "previous") in interpretations(alliance["total"][at(9)])

    # Flags: alliance rupture from report 3 to 9 (75 % at report 2 is not below the floor);
    # deterioration of sad affect and hopelessness at report 13
    flags = check_flags(system_client, sonja)
    assert set(flags) == {RUPTURE, "deterioration/sad", "deterioration/hopeless"}
    (rupture,) = flags[RUPTURE]
    assert rupture["status"] == "inactive"
    assert rupture["period"] == {"start": at(3), "end": at(9)}
    assert "reliably lower than last time" in rupture["code"]["text"]
    assert "42.8571 % < 75 %" in rupture["code"]["text"]
    for scale in ("sad", "hopeless"):
        (flag,) = flags[f"deterioration/{scale}"]
        assert flag["status"] == "active"
        assert flag["period"] == {"start": at(13)}
    assert search(system_client, f"Task?patient=Patient/{sonja.patient}") == []  # nothing urgent

    # The report per administration names the alerts and the stagnating scales
    reports = check_reports(system_client, sonja, ["internal", "worry", "control", "sad", "hopeless"])
    assert reports[at(3)]["conclusion"].startswith("Alert: alliance rupture")
    # Eating, suicidality and substance use sit at the fixture's level 2 throughout: in the elevated
    # range of a scale that closes below 1.5 (issue 13), so they stagnate too.
    stagnating = "Eating Problems, Suicidality, Substance Use, Worry, Internal Avoidance, Need for Control"
    assert f"Stagnation: {stagnating}." in reports[at(13)]["conclusion"]
    assert (
        "Reliable deterioration since the first administration: Sad Affect, Hopelessness, Need for Control."
        in (reports[at(13)]["conclusion"])
    )
    assert not reports[at(12)]["conclusion"].startswith("Alert")

    # Preferences: more focus on feelings at 6 (and 7), as it is now two reports later
    prefs = by_effective(
        search(system_client, f"Observation?subject=Patient/{sonja.patient}&code={CS_ITEMS}|pref-feelings")
    )
    assert sorted(prefs) == sorted(sonja.authored)
    wanted = {6: "more", 7: "more", 8: "as-now"}
    for number, value in wanted.items():
        assert first_code(prefs[at(number)]["valueCodeableConcept"]) == (CS_PREFERENCE, value)
    others = [first_code(o["valueCodeableConcept"])[1] for w, o in prefs.items() if w not in map(at, wanted)]
    assert set(others) == {"as-now"}

    # Retries: the same response again (same identifier and content) is 200 and creates nothing
    check_retry(system_client, sonja, [3, 13])


# --- Harald -------------------------------------------------------------------------------------------------

# The 14 of his 33 reports the story names (9, 11, 17, 18, 21, 26-27, 30-33) and a few between, as listed
# in fhir_norse/rom/demo/case-studies.yaml (the demo carries them forward to all 33; this test does not).
HARALD = list(case_study("harald").reports)


def test_harald(server: TestClient) -> None:
    system_client = server
    harald = run(system_client, "Harald", HARALD, date(2024, 2, 5), 17)
    at = harald.at

    # Inner pain stable (stagnation) until the sudden improvement, then reliably better than at first
    sad = check_scale_observations(system_client, harald, "sad")
    self_crit = check_scale_observations(system_client, harald, "selfCrit")
    assert stagnation_reports(sad, harald) == [17, 18, 20, 21, 24]
    assert stagnation_reports(self_crit, harald) == [17, 18, 20, 21, 24, 26]
    assert ("reliable-improvement", "previous") in interpretations(sad[harald.index(26)])
    assert ("reliable-improvement", "previous") in interpretations(self_crit[harald.index(27)])
    assert {("reliable-improvement", "first"), ("within-range", None)} <= interpretations(sad[-1])
    assert sad[-1]["valueQuantity"]["value"] == 2

    # Social avoidance after the trauma reminder: elevated at 30 and 31, settled at 32
    avoid = check_scale_observations(system_client, harald, "avoidSoc")
    assert ("reliable-deterioration", "previous") in interpretations(avoid[harald.index(30)])
    assert ("elevated", None) in interpretations(avoid[harald.index(31)])
    assert {("within-range", None), ("reliable-improvement", "previous")} <= interpretations(
        avoid[harald.index(32)]
    )

    # Alliance weak at 9, 11 and 17 (under 60 %), acceptable at 18-20, low again at 21
    alliance = check_alliance_observations(system_client, harald)
    for number in (9, 11, 17):
        value = quantity(alliance["total"][at(number)], "percent-of-max")
        assert value is not None and value < 60, number
    for number in (18, 20):
        value = quantity(alliance["total"][at(number)], "percent-of-max")
        assert value is not None and value >= 75, number
    assert ("reliable-deterioration", "previous") in interpretations(alliance["total"][at(21)])

    # The rupture Flag: raised at 1, the same Flag through 17, cleared at 18, a new one from 21
    flags = check_flags(system_client, harald)
    assert set(flags) == {RUPTURE, "deterioration/avoidSoc"}
    first, second = flags[RUPTURE]
    assert first["id"] != second["id"]
    assert first["status"] == "inactive" and first["period"] == {"start": at(1), "end": at(18)}
    assert second["status"] == "active" and second["period"] == {"start": at(21)}
    assert "reliably lower" not in first["code"]["text"]
    assert "reliably lower than last time" in second["code"]["text"]
    assert "53.5714 % < 75 %" in second["code"]["text"]
    for number in (9, 11, 17):
        assert harald.flag_states[harald.index(number)][RUPTURE] == [(first["id"], "active")]
    (avoid_flag,) = flags["deterioration/avoidSoc"]
    assert avoid_flag["period"] == {"start": at(30), "end": at(31)}
    assert avoid_flag["status"] == "inactive"

    reports = check_reports(system_client, harald, ["sad", "selfCrit", "avoidSoc"])
    for number in (9, 11, 17, 21, 33):
        assert "alliance rupture" in reports[at(number)]["conclusion"], number
    for number in (18, 20):
        assert not reports[at(number)]["conclusion"].startswith("Alert"), number
    assert "avoidSoc: reliable deterioration since last time" in reports[at(30)]["conclusion"]
    assert "Reliable improvement since the first administration: Sad Affect" in reports[at(26)]["conclusion"]

    # First preferences at report 18, none before (nor after: he did not answer them again)
    prefs = search(
        system_client,
        f"Observation?subject=Patient/{harald.patient}&_profile={BASE}/StructureDefinition/rom-preference",
    )
    assert {o["effectiveDateTime"] for o in prefs} == {at(18)}
    got = {first_code(o["code"])[1]: first_code(o["valueCodeableConcept"]) for o in prefs}
    assert got == {
        "pref-techniques": (CS_PREFERENCE, "more"),
        "pref-style": (CS_PREFERENCE, "less"),
        "pref-feelings": (CS_PREFERENCE, "more"),
        "pref-feelings-thoughts": (CS_PREFERENCE, "more"),
        "pref-relationship": (CS_PREFERENCE, "more"),
    }

    check_retry(system_client, harald, [1, 21])
