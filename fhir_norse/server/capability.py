"""The CapabilityStatement, generated from what this server really implements.

https://hl7.org/fhir/R4/capabilitystatement.html. Resource types, interactions, search
parameters and includes are read from the same registries the server runs on, so the
statement cannot drift from the code: the search parameters from the kernel's registry (R4's and the
content pack's SearchParameters, each with its ``definition`` canonical), the interactions from the
interaction table
(:mod:`fhir_norse.server.interactions`), the operations from the operation registry (only those this
server runs), ``supportedProfile`` from the profiles of the content pack
(:class:`~fhir_norse.server.profiles.ProfileValidator`) by the type they constrain.
"""

from __future__ import annotations

from typing import Any

from fhir_norse import __version__
from fhir_norse.server.context import RequestContext, Result
from fhir_norse.server.interactions import SYSTEM_INTERACTION_CODES, TYPE_INTERACTION_CODES, FhirService
from fhir_norse.server.operations.registry import Operation
from fhir_norse.server.subscriptions import advertised_topics
from fhir_norse.server.subscriptions.model import EXT_TOPIC_CANONICAL, PROFILE_SUBSCRIPTION
from fhir_norse.store.resource_types import SUPPORTED_TYPES
from fhir_norse.store.search.params import RESOURCE_COLUMN_PARAMS

# Bulk Data Access 2.0 (https://hl7.org/fhir/uv/bulkdata/STU2/): the server CapabilityStatement a server
# with the $export operations instantiates, and those operations' canonicals.
BULK_DATA_CAPABILITY = "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"
BULK_DATA_DEFINITIONS = frozenset(
    f"http://hl7.org/fhir/uv/bulkdata/OperationDefinition/{name}"
    for name in ("export", "patient-export", "group-export")
)


def _resource(service: FhirService, res_type: str) -> dict[str, Any]:
    definitions = service.registry.for_type(res_type)
    searchable = {d.code: d for d in service.registry.indexed(res_type)}
    for code in RESOURCE_COLUMN_PARAMS:
        if code in definitions:
            searchable[code] = definitions[code]
    params = [
        {
            "name": d.code,
            "definition": d.url,
            "type": d.type,
            **({"documentation": d.description} if d.description else {}),
        }
        for d in sorted(searchable.values(), key=lambda d: d.code)
    ]
    references = sorted(d.code for d in searchable.values() if d.type == "reference")
    revincludes = sorted(
        f"{other}:{d.code}"
        for other in SUPPORTED_TYPES
        for d in service.registry.indexed(other)
        if d.type == "reference" and (not d.targets or res_type in d.targets)
    )
    supported = []
    profiles = service.kernel.profiles
    if profiles is not None:
        supported = [u for u in profiles.urls if profiles.profile_type(u) == res_type]
    extensions: list[dict[str, Any]] = []
    if res_type == "Subscription" and (topics := advertised_topics(service.kernel.hooks)):
        # Subscriptions R5 Backport: the topics this server runs, and the profile of its Subscriptions.
        extensions = [{"url": EXT_TOPIC_CANONICAL, "valueCanonical": topic} for topic in topics]
        supported = [*supported, PROFILE_SUBSCRIPTION]
    return {
        **({"extension": extensions} if extensions else {}),
        "type": res_type,
        "profile": f"http://hl7.org/fhir/StructureDefinition/{res_type}",
        **({"supportedProfile": supported} if supported else {}),
        "interaction": [{"code": code} for code in TYPE_INTERACTION_CODES],
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalRead": "full-support",
        "conditionalUpdate": True,
        "conditionalDelete": "single",
        "referencePolicy": ["literal", "local"],
        "searchInclude": ["*", *(f"{res_type}:{code}" for code in references)],
        "searchRevInclude": revincludes,
        "searchParam": params,
        "operation": [_operation(o) for o in service.operations.for_type(res_type)],
    }


def _operation(o: Operation) -> dict[str, Any]:
    return {
        "name": o.name,
        "definition": o.definition,
        **({"documentation": o.documentation} if o.documentation else {}),
    }


def capability_statement(service: FhirService, ctx: RequestContext) -> Result:
    system = service.operations.system()
    statement: dict[str, Any] = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-26",
        "publisher": "fhir-norse",
        "kind": "instance",
        "software": {"name": "fhir-norse", "version": __version__},
        "implementation": {"description": "fhir-norse FHIR R4 server", "url": ctx.base_url},
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Search results are paged with opaque keyset cursors; _total is only computed when "
                    "_total=accurate is asked for. Only the search parameters listed per type are "
                    "indexed and answered; any other is ignored unless 'Prefer: handling=strict' is sent."
                ),
                "resource": [_resource(service, t) for t in SUPPORTED_TYPES],
                "interaction": [{"code": code} for code in SYSTEM_INTERACTION_CODES],
                **({"operation": [_operation(o) for o in system]} if system else {}),
            }
        ],
    }
    if any(o.definition in BULK_DATA_DEFINITIONS for o in service.operations):
        # Bulk Data Access: the IG's server CapabilityStatement, which this server implements.
        statement["instantiates"] = [BULK_DATA_CAPABILITY]
    return Result(200, body=statement)
