"""JSON Patch (RFC 6902) applied with a bound on what it may build.

https://hl7.org/fhir/R4/http.html#patch. A patch document is bounded by the request body limit, but
its ``copy`` operations are not: each can duplicate a subtree of the resource, so a few dozen of them
double a resource past any memory. The operations are applied one at a time and the bytes each
``copy``, ``add`` or ``replace`` brings in are counted before it is applied, so the work done is
bounded by ``max_bytes`` whatever the operations are.
"""

from __future__ import annotations

from typing import Any

import jsonpatch
import jsonpointer
import orjson

from fhir_norse.outcomes import BadRequest, PayloadTooLarge, Unprocessable

# Operations that put new content into the document, and where that content comes from.
_FROM_VALUE = frozenset({"add", "replace"})


def _size(value: Any) -> int:
    try:
        return len(orjson.dumps(value))
    except orjson.JSONEncodeError as exc:  # past orjson's 255 levels: a copy of a subtree into itself
        raise BadRequest("The JSON Patch nests the resource too deeply", code="too-costly") from exc


def apply_patch(document: Any, operations: list[Any], *, max_bytes: int) -> Any:
    """``document`` with ``operations`` applied (a copy), or 413 once the result could pass ``max_bytes``.

    The running size is an upper bound (removals are not subtracted), so a patch is refused only
    when its additions alone could reach the limit."""
    size = _size(document)
    patched = jsonpatch.JsonPatch([]).apply(document)  # one copy; the operations then work in place
    try:
        for operation in operations:
            if not isinstance(operation, dict):
                raise Unprocessable("A JSON Patch operation is an object", code="processing")
            op = operation.get("op")
            if op == "copy":
                source = jsonpointer.resolve_pointer(patched, str(operation.get("from")))
                size += _size(source)
            elif op in _FROM_VALUE and "value" in operation:
                size += _size(operation["value"])
            if size > max_bytes:
                raise PayloadTooLarge(
                    f"The JSON Patch would make the resource larger than {max_bytes} bytes",
                    code="too-costly",
                )
            patched = jsonpatch.JsonPatch([operation]).apply(patched, in_place=True)
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, TypeError, KeyError) as exc:
        raise Unprocessable(f"The JSON Patch cannot be applied: {exc}", code="processing") from exc
    return patched
