"""Alert rules for one administration (pure: plain values in, plain values out).

Input: the state of every scored scale and of the alliance at the current administration, the linkIds
answered "prefer not to answer", and the alerts already active for the patient. Output: an
:class:`AlertDecision` saying which alerts to raise, keep and resolve; the server writes them as FHIR
``Flag`` resources (https://hl7.org/fhir/R4/flag.html) plus a ``Task`` when urgent.

Rules (``../shared/domain/README.md``, "Change, stagnation and alerts"; issue 5, item 4):

* ``suicide-risk`` (urgent): the suicidality trigger, scored in the problem direction, is strictly above
  the suicide scale's opening threshold, or the suicide scale score is strictly above
  ``suicide_score_gt`` (default: the same opening threshold, as both lie on the 1-7 score scale). This is
  deliberately not the scale's elevated range (``elevated_from``, by default the closing threshold 1.5 of
  suicidality), which would raise an urgent alert on almost any endorsement.
* ``deterioration`` (one per scale): the scale reliably deteriorated since the previous administration.
* ``alliance-rupture``: the alliance total reliably deteriorated (fell) since the previous
  administration, or the total, as percent of the maximum raw score, is strictly below
  ``alliance_floor_percent`` (default 75 %, i.e. a mean of 5.25 on 1-7). PCOMS signals an alliance
  problem at SRS <= 36 of 40 (90 %), but on a different instrument with a strong ceiling effect; 75 % is
  this project's starting point for Norse Feedback and is meant to be tuned per site.
* ``prefer-not-suicide``: any suicidality item answered "prefer not to answer" (not urgent by default).
* ``not-on-track`` (issue 19; one per scale and one for the alliance total, keyed ``alliance:<total>``;
  only where the mapping switches the signal on): the score is outside the expected-recovery band on
  its bad side at this administration and at the previous scored one (``fhir_norse.scoring.recovery``).
  An active one is kept while the score stays outside and resolved once it is back inside the band. Not
  urgent, but it asks for a review (``Alert.review``: a Task for the care manager, as urgent alerts do).

Identity: an alert is identified by ``(code, scale)``. An active alert whose condition still holds is
kept (the active instance is returned, never a second one); one whose condition was evaluated and no
longer holds is resolved; one whose condition cannot be evaluated at this administration (the scale or
the alliance was not scored, the suicidality trigger and score are both missing) is kept: missing data
is no evidence that a problem cleared. Two active alerts with the same identity are a duplicate; the
later one is resolved.

Which classification counts as "reliably deteriorated" is the caller's (``fhir_norse.scoring.change``):
for clinical scales higher is worse, for the alliance lower is worse. This module does not import the
scoring package, only its vocabulary.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from fhir_norse.instruments.schema import InstrumentMapping

__all__ = [
    "Alert",
    "AlertCode",
    "AlertDecision",
    "AlertRules",
    "AllianceState",
    "ChangeClass",
    "RecoveryState",
    "ScaleState",
    "evaluate_alerts",
]

AlertCode = Literal["suicide-risk", "deterioration", "alliance-rupture", "prefer-not-suicide", "not-on-track"]
# Same vocabulary as fhir_norse.scoring.change.ChangeClass (Literal types compare by value).
ChangeClass = Literal["reliably-deteriorated", "reliably-improved", "no-reliable-change"]

_DETERIORATED: ChangeClass = "reliably-deteriorated"


@dataclass(frozen=True)
class Alert:
    """One clinical alert. ``scale`` is set for per-scale alerts (deterioration, suicide-risk,
    not-on-track). ``review``: ask the care manager for a review (a Task) though it is not urgent."""

    code: AlertCode
    scale: str | None
    urgent: bool
    reason: str
    review: bool = False

    @property
    def key(self) -> tuple[AlertCode, str | None]:
        return (self.code, self.scale)


@dataclass(frozen=True)
class RecoveryState:
    """A score against its expected-recovery band (the signal is on and the score could be judged):
    ``outside`` now, ``outside_previous`` at the previous scored administration after intake (None: no
    such administration), and the words of the reason."""

    outside: bool
    outside_previous: bool | None
    detail: str


@dataclass(frozen=True)
class ScaleState:
    """One scale at the current administration.

    ``score`` is the scale score (``None``: not scored), ``trigger_score`` the trigger item's score in
    the problem direction (``None``: missing or answered "prefer not"), ``change_vs_previous`` the
    classification of the reliable change since the previous scored administration (``None``: no
    previous score or no current score).
    """

    scale: str
    score: float | None
    trigger_score: float | None = None
    change_vs_previous: ChangeClass | None = None
    recovery: RecoveryState | None = None


@dataclass(frozen=True)
class AllianceState:
    """The alliance total at the current administration (higher = better)."""

    total_mean: float | None
    total_percent: float | None
    change_vs_previous: ChangeClass | None = None
    recovery: RecoveryState | None = None
    total_code: str = "total"


@dataclass(frozen=True)
class AlertRules:
    """Thresholds of the rules; build it from the mapping with :meth:`from_mapping`."""

    suicide_scale: str
    suicide_trigger_gt: float
    suicide_score_gt: float
    suicide_items: frozenset[str]
    alliance_floor_percent: float = 75.0
    prefer_not_urgent: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.alliance_floor_percent <= 100:
            raise ValueError("alliance_floor_percent must be within 0-100")

    @classmethod
    def from_mapping(
        cls,
        mapping: InstrumentMapping,
        *,
        suicide_scale: str,
        suicide_score_gt: float | None = None,
        alliance_floor_percent: float = 75.0,
        prefer_not_urgent: bool = False,
    ) -> AlertRules:
        """Rules whose suicidality thresholds and items come from ``mapping``'s scale ``suicide_scale``."""
        scale = mapping.scale(suicide_scale)
        return cls(
            suicide_scale=scale.code,
            suicide_trigger_gt=scale.open_if_trigger_gt,
            suicide_score_gt=scale.open_if_trigger_gt if suicide_score_gt is None else suicide_score_gt,
            suicide_items=frozenset(scale.items),
            alliance_floor_percent=alliance_floor_percent,
            prefer_not_urgent=prefer_not_urgent,
        )


@dataclass(frozen=True)
class AlertDecision:
    """``raise_`` (``raise`` is a Python keyword): new alerts; ``keep``: active alerts that still hold
    or cannot be re-evaluated; ``resolve``: active alerts whose condition cleared (or duplicates)."""

    raise_: tuple[Alert, ...]
    keep: tuple[Alert, ...]
    resolve: tuple[Alert, ...]


_Key = tuple[AlertCode, str | None]


def _num(value: float) -> str:
    return f"{value:g}"


def evaluate_alerts(
    scales: Sequence[ScaleState],
    alliance: AllianceState | None,
    prefer_not: Collection[str],
    active: Iterable[Alert],
    rules: AlertRules,
) -> AlertDecision:
    """Apply the rules to one administration and reconcile them with the ``active`` alerts."""
    holding: dict[_Key, Alert] = {}
    evaluated: set[_Key] = set()

    suicide = next((s for s in scales if s.scale == rules.suicide_scale), None)
    if suicide is not None and (suicide.trigger_score is not None or suicide.score is not None):
        key: _Key = ("suicide-risk", rules.suicide_scale)
        evaluated.add(key)
        reasons = []
        if suicide.trigger_score is not None and suicide.trigger_score > rules.suicide_trigger_gt:
            reasons.append(
                f"suicidality trigger {_num(suicide.trigger_score)} > {_num(rules.suicide_trigger_gt)}"
            )
        if suicide.score is not None and suicide.score > rules.suicide_score_gt:
            reasons.append(f"suicidality score {_num(suicide.score)} > {_num(rules.suicide_score_gt)}")
        if reasons:
            holding[key] = Alert("suicide-risk", rules.suicide_scale, True, "; ".join(reasons))

    key = ("prefer-not-suicide", rules.suicide_scale)
    evaluated.add(key)
    withheld = sorted(rules.suicide_items.intersection(prefer_not))
    if withheld:
        holding[key] = Alert(
            "prefer-not-suicide",
            rules.suicide_scale,
            rules.prefer_not_urgent,
            "'prefer not to answer' on suicidality items: " + ", ".join(withheld),
        )

    for state in scales:
        if state.change_vs_previous is None:
            continue
        key = ("deterioration", state.scale)
        evaluated.add(key)
        if state.change_vs_previous == _DETERIORATED:
            holding[key] = Alert(
                "deterioration", state.scale, False, f"{state.scale}: reliable deterioration since last time"
            )

    if alliance is not None and (
        alliance.change_vs_previous is not None or alliance.total_percent is not None
    ):
        key = ("alliance-rupture", None)
        evaluated.add(key)
        reasons = []
        if alliance.change_vs_previous == _DETERIORATED:
            reasons.append("alliance total reliably lower than last time")
        if alliance.total_percent is not None and alliance.total_percent < rules.alliance_floor_percent:
            reasons.append(
                f"alliance total {_num(alliance.total_percent)} % < {_num(rules.alliance_floor_percent)} %"
            )
        if reasons:
            holding[key] = Alert("alliance-rupture", None, False, "; ".join(reasons))

    active = list(active)
    active_keys = {a.key for a in active}
    tracked = [(s.scale, s.recovery) for s in scales]
    if alliance is not None:
        tracked.append((f"alliance:{alliance.total_code}", alliance.recovery))
    for scale, recovery in tracked:
        if recovery is None:
            continue
        key = ("not-on-track", scale)
        evaluated.add(key)
        # Raised at the second administration in a row outside the band; kept while it stays outside.
        if recovery.outside and (recovery.outside_previous or key in active_keys):
            holding[key] = Alert("not-on-track", scale, False, recovery.detail, review=True)

    raise_: list[Alert] = []
    keep: list[Alert] = []
    resolve: list[Alert] = []
    seen: set[_Key] = set()
    for alert in active:
        if alert.key in seen:
            resolve.append(alert)
            continue
        seen.add(alert.key)
        if alert.key in holding or alert.key not in evaluated:
            keep.append(alert)
        else:
            resolve.append(alert)
    raise_.extend(alert for key, alert in holding.items() if key not in seen)
    return AlertDecision(tuple(raise_), tuple(keep), tuple(resolve))
