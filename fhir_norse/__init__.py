"""fhir-norse: a FHIR R4 server for routine outcome monitoring with clinical feedback."""

__version__ = "0.1.0"
