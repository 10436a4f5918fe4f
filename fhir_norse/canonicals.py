"""Every canonical URL and code system this project defines or writes, each defined once here.

The project's own canonicals live under :data:`BASE` (https://hl7.org/fhir/R4/resource.html#canonical):
code systems under ``CodeSystem/``, profiles and extensions under ``StructureDefinition/``, operations
under ``OperationDefinition/``, and the identifier systems of the things the server names itself. The
content pack (``questionnaires/``, ``profiles/``) publishes the resources these URLs resolve to.

A few external systems the builders write (LOINC, UCUM) are here too, so no module spells them twice.
This module imports nothing of the project: every layer may import it.
"""

from __future__ import annotations

from typing import Final

BASE: Final = "http://fhir-norse.org/fhir"


def code_system(cs_id: str) -> str:
    """The canonical of this project's CodeSystem ``cs_id``."""
    return f"{BASE}/CodeSystem/{cs_id}"


def value_set(vs_id: str) -> str:
    """The canonical of this project's ValueSet ``vs_id``."""
    return f"{BASE}/ValueSet/{vs_id}"


def structure_definition(sd_id: str) -> str:
    """The canonical of this project's profile or extension ``sd_id``."""
    return f"{BASE}/StructureDefinition/{sd_id}"


def questionnaire(q_id: str) -> str:
    """The canonical of this project's Questionnaire ``q_id`` (without ``|version``)."""
    return f"{BASE}/Questionnaire/{q_id}"


# --- code systems (questionnaires/terminology/, profiles/) -----------------------------------------
CS_SCALES: Final = code_system("nf21-scales")
CS_ALLIANCE: Final = code_system("nf21-alliance")
CS_ITEMS: Final = code_system("nf21-items")
CS_ANSWERS: Final = code_system("nf21-answers")
CS_DOMAINS: Final = code_system("nf21-domains")
CS_PREFERENCE: Final = code_system("preference-values")
CS_INTERPRETATION: Final = code_system("rom-interpretation")
CS_COMPONENTS: Final = code_system("rom-components")
CS_ROM: Final = code_system("rom-codes")
CS_ALERTS: Final = code_system("rom-alerts")
CS_CONTEXT: Final = code_system("administration-context")
# The meta.tag of published content (read-only through the API).
CS_CONTENT_TAGS: Final = code_system("content-tags")

# --- value sets ------------------------------------------------------------------------------------
VS_PANELS: Final = value_set("rom-panels")

# --- profiles and extensions (profiles/) -----------------------------------------------------------
PROFILE_SCALE_SCORE: Final = structure_definition("rom-scale-score")
PROFILE_ALLIANCE: Final = structure_definition("rom-alliance")
PROFILE_PREFERENCE: Final = structure_definition("rom-preference")
PROFILE_PANEL: Final = structure_definition("rom-panel")
PROFILE_REPORT: Final = structure_definition("rom-report")
PROFILE_FLAG: Final = structure_definition("rom-alert-flag")
PROFILE_OVERRIDE: Final = structure_definition("rom-scale-override")
PROFILE_QUESTIONNAIRE_RESPONSE: Final = structure_definition("rom-questionnaire-response")
CONTEXT_EXTENSION: Final = structure_definition("administration-context")
NF21_ITEM_EXTENSION: Final = structure_definition("nf21-item")

# --- operations: the base of ``OperationDefinition/<id>`` (profiles/OperationDefinition-*.json) -----
OPERATION_DEFINITION: Final = f"{BASE}/OperationDefinition/"

# --- identifier systems of things the server names itself ------------------------------------------
ALERT_KEY_SYSTEM: Final = f"{BASE}/alert-key"
MAPPING_SYSTEM: Final = f"{BASE}/mapping"
SOFTWARE_SYSTEM: Final = f"{BASE}/software"

# --- external systems ------------------------------------------------------------------------------
LOINC: Final = "http://loinc.org"
UCUM: Final = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/observation-category"

# --- the patient's way in (issue 15): monitoring plans, invitations ---------------------------------
# On an activity of a monitoring plan (CarePlan.activity.detail, or a plan ServiceRequest): the time
# the patient has to answer (valueDuration), and "one administration before each appointment, opening
# this long before it" (valueDuration). fhir_norse/rom/scheduler.py documents both.
EXT_ANSWER_WINDOW: Final = structure_definition("monitoring-answer-window")
EXT_BEFORE_APPOINTMENT: Final = structure_definition("monitoring-before-appointment")
# On Patient: the channels the patient declined (valueCode sms | email | all), fhir_norse/rom/invitations.py.
EXT_MESSAGING_OPT_OUT: Final = structure_definition("messaging-opt-out")
# Identifier systems of the messages a provider accepted (Communication.identifier): <base>/<provider>.
MESSAGE_ID_SYSTEM: Final = f"{BASE}/message-id"
