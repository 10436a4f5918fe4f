"""The operations this server runs (``$name``), one registry for the routes and the CapabilityStatement.

https://hl7.org/fhir/R4/operations.html. An :class:`Operation` names its resource types and levels,
whether it may be invoked with GET (it changes nothing), its OperationDefinition canonical, and its
handler. The server registers ``$validate`` and ``Patient/$everything``; the outcome-monitoring layer
registers its own (``$extract``, ``$next-question``, ``$populate``, ``$tailored-form``,
``$adaptive-state``) only where it runs them, so the CapabilityStatement lists exactly what answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fhir_norse.outcomes import BadRequest, MethodNotAllowed
from fhir_norse.server.context import RequestContext, Result


@dataclass(frozen=True, slots=True)
class OperationCall:
    """One invocation: where (type, instance; ``res_type`` "" at the system level), its parameters (the
    query string plus the simple parameters of a Parameters body), the parsed JSON body, if any, and the
    request headers an operation reads itself (``accept``, ``prefer``; lower-case names)."""

    ctx: RequestContext
    res_type: str
    res_id: str | None = None
    params: list[tuple[str, str]] = field(default_factory=list)
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def param(self, name: str) -> str | None:
        """The single value of ``name`` (400 when given twice)."""
        values = [v for k, v in self.params if k == name]
        if len(values) > 1:
            raise BadRequest(f"Parameter '{name}' is given more than once")
        return values[0] if values else None

    def params_named(self, name: str) -> list[str]:
        return [v for k, v in self.params if k == name]

    def all_params(self) -> list[tuple[str, str]]:
        """The query parameters plus the simple parameters of a Parameters body (the POST form)."""
        if isinstance(self.body, dict):
            return [*self.params, *parameters_as_pairs(self.body)]
        return list(self.params)


# Parameters of the response format (https://hl7.org/fhir/R4/http.html#parameters) that every operation
# accepts and leaves to the route.
PASSED_OVER = frozenset({"_format", "_pretty"})


def non_negative(name: str, value: str, *, code: str = "invalid") -> int:
    """The non-negative integer parameter ``name`` given as ``value`` (400 with ``code`` otherwise)."""
    if not value.isdigit() or len(value) > 18:
        raise BadRequest(f"{name} must be a non-negative integer, not '{value}'", code=code)
    return int(value)


def parameters_as_pairs(body: dict[str, Any]) -> list[tuple[str, str]]:
    """The simple parameters of a Parameters resource as (name, text) pairs."""
    if body.get("resourceType") != "Parameters":
        raise BadRequest("the body of this operation is a Parameters resource", code="structure")
    out: list[tuple[str, str]] = []
    for param in body.get("parameter") or []:
        name = param.get("name")
        for key, value in param.items():
            if not key.startswith("value") or not isinstance(name, str):
                continue
            if isinstance(value, str):
                out.append((name, value))
            elif isinstance(value, dict) and isinstance(value.get("reference"), str):
                out.append((name, value["reference"]))
            elif isinstance(value, dict) and isinstance(value.get("code"), str):
                out.append((name, value["code"]))
    return out


# Called with the :class:`~fhir_norse.server.interactions.FhirService` that runs it (typed loosely here:
# the service imports this registry).
Handler = Callable[[Any, OperationCall], Result]


@dataclass(frozen=True, slots=True)
class Operation:
    name: str  # without the "$"
    definition: str
    types: tuple[str, ...]  # ("*",): every resource type
    handler: Handler
    type_level: bool = True
    instance_level: bool = False
    # May be invoked with GET (it changes nothing): https://hl7.org/fhir/R4/operations.html#request.
    idempotent: bool = False
    documentation: str | None = None
    # Invoked on the base (``[base]/$name``); such an operation names no types.
    system_level: bool = False

    def applies_to(self, res_type: str) -> bool:
        return "*" in self.types or res_type in self.types


class OperationRegistry:
    """The operations of a server; built once, never changed."""

    def __init__(self, operations: Iterable[Operation] = ()) -> None:
        self._operations = tuple(operations)
        names = [(o.name, t) for o in self._operations for t in o.types]
        if len(names) != len(set(names)):
            raise ValueError("an operation is registered twice for one resource type")

    def __iter__(self) -> Iterator[Operation]:
        return iter(self._operations)

    def for_type(self, res_type: str) -> list[Operation]:
        return [o for o in self._operations if o.applies_to(res_type)]

    def system(self) -> list[Operation]:
        """The operations invoked on the base (``[base]/$name``)."""
        return [o for o in self._operations if o.system_level]

    def find_system(self, name: str, *, method: str) -> Operation:
        """The system-level operation ``$name``, or 400 ``not-supported`` (405 as in :meth:`find`)."""
        for operation in self.system():
            if operation.name == name:
                if method == "GET" and not operation.idempotent:
                    raise MethodNotAllowed(f"${name} is invoked with POST")
                return operation
        raise BadRequest(f"Operation ${name} is not supported on the system level", code="not-supported")

    def find(self, name: str, res_type: str, *, instance: bool, method: str) -> Operation:
        """The operation invoked, or 400 ``not-supported`` (405 for GET on one that changes state)."""
        for operation in self._operations:
            if operation.name != name or not operation.applies_to(res_type):
                continue
            if (operation.instance_level if instance else operation.type_level) is False:
                continue
            if method == "GET" and not operation.idempotent:
                raise MethodNotAllowed(f"${name} is invoked with POST")
            return operation
        level = "an instance of " if instance else ""
        raise BadRequest(f"Operation ${name} is not supported on {level}{res_type}", code="not-supported")
