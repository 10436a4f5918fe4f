"""One exception family for every FHIR error, rendered as an OperationOutcome.

Each class fixes the HTTP status and the default ``issue.code`` (from
http://hl7.org/fhir/valueset-issue-type.html). The API layer turns any
:class:`FhirError` into an OperationOutcome response with that status; anything else
becomes a 500 without internals. See https://hl7.org/fhir/R4/operationoutcome.html.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class Issue:
    """One ``OperationOutcome.issue``."""

    diagnostics: str
    code: str = "processing"
    severity: str = "error"
    expression: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            out["expression"] = list(self.expression)
        return out


def operation_outcome(issues: list[Issue] | tuple[Issue, ...]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in issues]}


def information(message: str, code: str = "informational") -> dict[str, Any]:
    return operation_outcome([Issue(message, code=code, severity="information")])


class FhirError(Exception):
    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "exception"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        expression: str | list[str] | None = None,
        issues: list[Issue] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        if issues:
            self.issues = list(issues)
        else:
            expr: tuple[str, ...] = (
                ()
                if expression is None
                else (expression,)
                if isinstance(expression, str)
                else tuple(expression)
            )
            self.issues = [Issue(message, code=code or self.default_code, expression=expr)]

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)


class BadRequest(FhirError):
    """400: malformed request, unparseable JSON, or a resource that fails validation."""

    status = 400
    default_code = "invalid"


class Unauthorized(FhirError):
    status = 401
    default_code = "login"


class Forbidden(FhirError):
    status = 403
    default_code = "forbidden"


class NotFound(FhirError):
    status = 404
    default_code = "not-found"


class MethodNotAllowed(FhirError):
    status = 405
    default_code = "not-supported"


class NotAcceptable(FhirError):
    status = 406
    default_code = "not-supported"


class Conflict(FhirError):
    status = 409
    default_code = "conflict"


class Gone(FhirError):
    status = 410
    default_code = "deleted"


class PreconditionFailed(FhirError):
    status = 412
    default_code = "conflict"


class PayloadTooLarge(FhirError):
    status = 413
    default_code = "too-costly"


class UnsupportedMediaType(FhirError):
    status = 415
    default_code = "not-supported"


class Unprocessable(FhirError):
    """422: the request is well-formed but breaks a business rule."""

    status = 422
    default_code = "business-rule"


class InternalError(FhirError):
    status = 500
    default_code = "exception"
