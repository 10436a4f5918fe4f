"""Clinical alerts (pure): the scores of one administration plus the active alerts -> what to raise,
keep and resolve. The server turns the decision into Flag resources and, when urgent, a Task."""

from fhir_norse.alerts.rules import (
    Alert,
    AlertCode,
    AlertDecision,
    AlertRules,
    AllianceState,
    RecoveryState,
    ScaleState,
    evaluate_alerts,
)

__all__ = [
    "Alert",
    "AlertCode",
    "AlertDecision",
    "AlertRules",
    "AllianceState",
    "RecoveryState",
    "ScaleState",
    "evaluate_alerts",
]
