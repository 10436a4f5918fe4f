"""The R4 search parameter registry."""

from __future__ import annotations

from fhir_norse.store.search.params import default_registry


def test_id_is_the_r4_resource_id_parameter_not_the_example() -> None:
    """The R4 definitions bundle also carries an example SearchParameter with code ``_id``; the
    CapabilityStatement must point at ``Resource-id``."""
    registry = default_registry()
    for res_type in ("Patient", "Observation", "Flag"):
        definition = registry.get(res_type, "_id")
        assert definition is not None
        assert definition.url == "http://hl7.org/fhir/SearchParameter/Resource-id"
    assert registry.get("Patient", "part-agree") is None
