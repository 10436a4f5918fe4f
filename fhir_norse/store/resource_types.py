"""The resource types this server stores and serves (R4 4.0.1 names).

Any other type answers 404 with an OperationOutcome. The list also drives which
official SearchParameter and StructureDefinition resources are shipped in
``fhir_norse/definitions`` (see ``tools/extract_definitions.py``).
"""

SUPPORTED_TYPES: tuple[str, ...] = (
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "CareTeam",
    "EpisodeOfCare",
    "CarePlan",
    "Encounter",
    "Appointment",
    "Questionnaire",
    "QuestionnaireResponse",
    "Observation",
    "DiagnosticReport",
    "DocumentReference",
    "Flag",
    "Task",
    "ServiceRequest",
    "CommunicationRequest",
    "Communication",
    "Provenance",
    "AuditEvent",
    "Consent",
    "Group",
    "Subscription",
    "Basic",
    "Binary",
    "CodeSystem",
    "ValueSet",
    "ConceptMap",
    "StructureDefinition",
    "SearchParameter",
    "OperationDefinition",
    "Library",
)

SUPPORTED_TYPE_SET: frozenset[str] = frozenset(SUPPORTED_TYPES)
