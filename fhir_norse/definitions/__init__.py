"""Official FHIR R4 4.0.1 definitions this server ships (CC0, from ``hl7.fhir.r4.core``), as data.

Extracted by ``tools/extract_definitions.py``; read by the store (SearchParameters), the access policy
(the Patient CompartmentDefinition) and the server (StructureDefinitions, summary elements, value sets).
"""

from pathlib import Path

DIR = Path(__file__).resolve().parent
