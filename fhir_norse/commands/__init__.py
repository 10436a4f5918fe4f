"""Command-line adapters of ``fhir-norse`` that combine layers (content, scoring, storage)."""
