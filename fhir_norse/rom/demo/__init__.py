"""The demo clinic a newcomer sees after ``make serve`` (``fhir-norse demo``): the case study's two patients,
three synthetic ones, their clinician and care teams, loaded through the FHIR service.

:mod:`~fhir_norse.rom.demo.scenarios` holds the patients' report sequences (data files beside it; the
case-study test reads Sonja's and Harald's from there too), :mod:`~fhir_norse.rom.demo.clinic` loads them.
"""

from __future__ import annotations

from fhir_norse.rom.demo.clinic import (
    DemoClinician,
    DemoError,
    DemoPatient,
    DemoResult,
    load_demo,
    site_root,
)

__all__ = ["DemoClinician", "DemoError", "DemoPatient", "DemoResult", "load_demo", "site_root"]
