"""Intake validation of a QuestionnaireResponse against the Questionnaire it names (pure, no I/O).

Implements the answer rules of https://hl7.org/fhir/R4/questionnaireresponse.html (invariants and the
"Questionnaire constraints" section) and the SDC conventions form fillers rely on
(https://hl7.org/fhir/uv/sdc/STU3/): every answered linkId exists; the value type matches the item type;
codes come from ``answerOption``; ``repeats`` is respected; no answers to items disabled by
``enableWhen`` (R4: a disabled item disables its descendants); for ``completed`` and ``amended`` every
enabled ``required`` item is answered, except items of scales the adaptive engine has closed.

Tolerated on purpose (standard form fillers send them): extensions on answers and answer Codings (such
as ``ordinalValue``), ``meta.profile``/``meta.tag`` values, and answers to calculated (``readOnly``)
items. Each problem is an :class:`Issue` whose expression names the path in the response and whose
diagnostics name the linkId. Resolving the Questionnaire, ``subject`` and ``authored`` are the
caller's job.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from fhir_norse.instruments.schema import InstrumentMapping
from fhir_norse.outcomes import Issue

__all__ = ["validate_response"]

_STATUSES = frozenset({"in-progress", "completed", "amended", "entered-in-error", "stopped"})
_NEEDS_REQUIRED = frozenset({"completed", "amended"})

# The value[x] choices of QuestionnaireResponse.item.answer allowed for each Questionnaire item type.
_VALUE_TYPES: dict[str, frozenset[str]] = {
    "boolean": frozenset({"valueBoolean"}),
    "decimal": frozenset({"valueDecimal"}),
    "integer": frozenset({"valueInteger"}),
    "date": frozenset({"valueDate"}),
    "dateTime": frozenset({"valueDateTime"}),
    "time": frozenset({"valueTime"}),
    "string": frozenset({"valueString"}),
    "text": frozenset({"valueString"}),
    "url": frozenset({"valueUri"}),
    "choice": frozenset({"valueCoding"}),
    "open-choice": frozenset({"valueCoding", "valueString"}),
    "attachment": frozenset({"valueAttachment"}),
    "reference": frozenset({"valueReference"}),
    "quantity": frozenset({"valueQuantity"}),
}

_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")
_DATETIME = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$")
_TIME = re.compile(r"^\d{2}:\d{2}(:\d{2}(\.\d+)?)?$")

# enableWhen.answer[x] -> the QuestionnaireResponse answer value[x] it is compared with.
_ENABLE_WHEN_ANSWER = {
    "answerBoolean": "valueBoolean",
    "answerDecimal": "valueDecimal",
    "answerInteger": "valueInteger",
    "answerDate": "valueDate",
    "answerDateTime": "valueDateTime",
    "answerTime": "valueTime",
    "answerString": "valueString",
    "answerCoding": "valueCoding",
    "answerQuantity": "valueQuantity",
    "answerReference": "valueReference",
}
_NUMERIC = frozenset({"valueInteger", "valueDecimal"})


@dataclass(slots=True)
class _QItem:
    item: dict[str, Any]
    parent: str | None

    @property
    def type(self) -> str:
        return str(self.item.get("type", ""))


@dataclass(slots=True)
class _Context:
    questionnaire: dict[str, Any]
    label: str
    items: dict[str, _QItem]
    # Every answer value given anywhere in the response, per linkId (for enableWhen).
    answers: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)
    enabled_cache: dict[str, bool] = field(default_factory=dict)


def validate_response(
    response: dict[str, Any],
    questionnaire: dict[str, Any],
    *,
    closed_scales: frozenset[str] = frozenset(),
    mapping: InstrumentMapping | None = None,
) -> list[Issue]:
    """Return every problem of ``response`` against ``questionnaire``; an empty list means valid.

    ``closed_scales`` are scale codes (of ``mapping``) whose items were not asked this time, so their
    ``required`` items need no answer; without a mapping it is ignored.
    """
    ctx = _Context(questionnaire=questionnaire, label=_label(questionnaire), items=_index(questionnaire))
    issues: list[Issue] = []
    status = response.get("status")
    if status not in _STATUSES:
        issues.append(
            Issue(
                f"status {status!r} is not a QuestionnaireResponse status",
                code="value",
                expression=("QuestionnaireResponse.status",),
            )
        )
    for link_id, _path, answer in _walk_answers(response.get("item", []), "QuestionnaireResponse"):
        value = _value_of(answer)
        if value is not None:
            ctx.answers.setdefault(link_id, []).append(value)

    _check_items(ctx, response.get("item", []), "QuestionnaireResponse", None, issues)
    if status in _NEEDS_REQUIRED:
        _check_required(ctx, response, closed_scales if mapping is not None else frozenset(), mapping, issues)
    return issues


def _label(questionnaire: dict[str, Any]) -> str:
    name = questionnaire.get("id") or questionnaire.get("url") or "the Questionnaire"
    version = questionnaire.get("version")
    return f"{name} {version}" if version else str(name)


def _index(questionnaire: dict[str, Any]) -> dict[str, _QItem]:
    out: dict[str, _QItem] = {}

    def add(items: list[dict[str, Any]], parent: str | None) -> None:
        for it in items:
            link_id = it.get("linkId")
            if isinstance(link_id, str):
                out[link_id] = _QItem(it, parent)
                add(it.get("item", []), link_id)

    add(questionnaire.get("item", []), None)
    return out


def _walk_answers(items: list[dict[str, Any]], path: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yield (linkId, answer path, answer) for every answer, at any depth."""
    for i, it in enumerate(items):
        here = f"{path}.item[{i}]"
        link_id = str(it.get("linkId", ""))
        for j, ans in enumerate(it.get("answer", [])):
            yield link_id, f"{here}.answer[{j}]", ans
            yield from _walk_answers(ans.get("item", []), f"{here}.answer[{j}]")
        yield from _walk_answers(it.get("item", []), here)


def _value_of(answer: dict[str, Any]) -> tuple[str, Any] | None:
    keys = [k for k in answer if k.startswith("value")]
    if len(keys) != 1:
        return None
    return keys[0], answer[keys[0]]


def _check_items(
    ctx: _Context,
    items: list[dict[str, Any]],
    path: str,
    parent: str | None,
    issues: list[Issue],
) -> None:
    for i, it in enumerate(items):
        here = f"{path}.item[{i}]"
        link_id = it.get("linkId")
        q = ctx.items.get(link_id) if isinstance(link_id, str) else None
        if q is None:
            issues.append(
                Issue(f"linkId {link_id!r} is not in {ctx.label}", code="structure", expression=(here,))
            )
            continue
        if q.parent != parent:
            where = f"under {q.parent!r}" if q.parent else "at the top level"
            issues.append(
                Issue(
                    f"linkId {link_id!r} is placed wrongly: in {ctx.label} it is {where}",
                    code="structure",
                    expression=(here,),
                )
            )
            continue
        _check_item(ctx, it, q, here, issues)


def _check_item(ctx: _Context, it: dict[str, Any], q: _QItem, here: str, issues: list[Issue]) -> None:
    link_id = str(it["linkId"])
    answers: list[dict[str, Any]] = it.get("answer", [])
    qtype = q.type
    if qtype in ("group", "display"):
        if answers:
            issues.append(
                Issue(
                    f"linkId {link_id!r} is a {qtype} item and cannot carry answers",
                    code="structure",
                    expression=(f"{here}.answer[0]",),
                )
            )
            return
        if qtype == "display" and it.get("item"):
            issues.append(
                Issue(
                    f"linkId {link_id!r} is a display item and has no children",
                    code="structure",
                    expression=(f"{here}.item[0]",),
                )
            )
            return
        _check_items(ctx, it.get("item", []), here, link_id, issues)
        return

    if it.get("item"):
        # Children of a question are nested under its answers, never beside them.
        issues.append(
            Issue(
                f"linkId {link_id!r} is a question: its child items belong under answer.item",
                code="structure",
                expression=(f"{here}.item[0]",),
            )
        )
    if answers and not _enabled(ctx, link_id):
        issues.append(
            Issue(
                f"linkId {link_id!r} is answered but is disabled by enableWhen in {ctx.label}",
                code="business-rule",
                expression=(here,),
            )
        )
        return
    if len(answers) > 1 and not q.item.get("repeats", False):
        issues.append(
            Issue(
                f"linkId {link_id!r} does not repeat but has {len(answers)} answers",
                code="structure",
                expression=(f"{here}.answer[1]",),
            )
        )
    for j, ans in enumerate(answers):
        apath = f"{here}.answer[{j}]"
        problem = _answer_problem(q, ans)
        if problem is not None:
            code, message = problem
            issues.append(Issue(f"linkId {link_id!r}: {message}", code=code, expression=(apath,)))
        _check_items(ctx, ans.get("item", []), apath, link_id, issues)


def _answer_problem(q: _QItem, ans: dict[str, Any]) -> tuple[str, str] | None:
    keys = [k for k in ans if k.startswith("value")]
    if not keys:
        return "required", "answer has no value"
    if len(keys) > 1:
        return "structure", f"answer has more than one value ({', '.join(sorted(keys))})"
    key, value = keys[0], ans[keys[0]]
    qtype = q.type
    options: list[dict[str, Any]] = q.item.get("answerOption", [])
    allowed = set(_VALUE_TYPES.get(qtype, frozenset()))
    if qtype in ("choice", "open-choice"):
        # R4 answerOption may also be integer, date, time or string.
        allowed |= {k for opt in options for k in opt if k.startswith("value")}
    if key not in allowed:
        expected = " or ".join(sorted(allowed)) or "no value"
        return "value", f"item type {qtype!r} expects {expected}, got {key}"
    shape = _shape_problem(key, value)
    if shape is not None:
        return "value", shape
    # Free text is what open-choice adds to the list; everything else must be one of the options.
    free_text = qtype == "open-choice" and key == "valueString"
    if options and not free_text and not _in_options(key, value, options):
        return "code-invalid", f"{_show(key, value)} is not an answerOption of the item"
    return None


def _shape_problem(key: str, value: Any) -> str | None:
    ok: bool
    if key == "valueBoolean":
        ok = isinstance(value, bool)
    elif key == "valueInteger":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif key == "valueDecimal":
        ok = isinstance(value, int | float | Decimal) and not isinstance(value, bool)
    elif key == "valueDate":
        ok = isinstance(value, str) and bool(_DATE.match(value))
    elif key == "valueDateTime":
        ok = isinstance(value, str) and bool(_DATETIME.match(value))
    elif key == "valueTime":
        ok = isinstance(value, str) and bool(_TIME.match(value))
    elif key in ("valueString", "valueUri"):
        ok = isinstance(value, str) and value != ""
    elif key == "valueCoding":
        ok = isinstance(value, dict) and isinstance(value.get("code"), str)
    else:
        ok = isinstance(value, dict)
    return None if ok else f"{key} {value!r} is not a valid {key[5:]}"


def _in_options(key: str, value: Any, options: list[dict[str, Any]]) -> bool:
    for opt in options:
        if key not in opt:
            continue
        if key == "valueCoding":
            if _coding_equal(opt[key], value):
                return True
        elif opt[key] == value:
            return True
    return False


def _coding_equal(expected: dict[str, Any], given: dict[str, Any]) -> bool:
    # Only system and code identify a concept; display, version and extensions (ordinalValue) do not.
    return expected.get("code") == given.get("code") and expected.get("system") == given.get("system")


def _show(key: str, value: Any) -> str:
    if key == "valueCoding" and isinstance(value, dict):
        return f"code {value.get('system', '')}|{value.get('code', '')}"
    return f"{key} {value!r}"


# --- enableWhen ---------------------------------------------------------------------------------------


def _enabled(ctx: _Context, link_id: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether ``link_id`` is enabled: its own enableWhen holds and (R4) every ancestor is enabled."""
    cached = ctx.enabled_cache.get(link_id)
    if cached is not None:
        return cached
    if link_id in seen:  # a cycle in enableWhen: treat as enabled rather than loop
        return True
    seen = seen | {link_id}
    q = ctx.items.get(link_id)
    result = True
    if q is not None:
        if q.parent is not None and not _enabled(ctx, q.parent, seen):
            result = False
        else:
            conditions: list[dict[str, Any]] = q.item.get("enableWhen", [])
            if conditions:
                outcomes = [_condition(ctx, c, seen) for c in conditions]
                result = any(outcomes) if q.item.get("enableBehavior") == "any" else all(outcomes)
    ctx.enabled_cache[link_id] = result
    return result


def _condition(ctx: _Context, cond: dict[str, Any], seen: frozenset[str]) -> bool:
    question = str(cond.get("question", ""))
    # Answers to a disabled question do not count: a form filler removes them.
    given = ctx.answers.get(question, []) if _enabled(ctx, question, seen) else []
    operator = cond.get("operator")
    answer_keys = [k for k in cond if k.startswith("answer")]
    if not answer_keys:
        return False
    akey = answer_keys[0]
    expected = cond[akey]
    if operator == "exists":
        return bool(given) == bool(expected)
    vkey = _ENABLE_WHEN_ANSWER.get(akey)
    # Integer and decimal compare as numbers whichever of the two the question uses.
    keys = _NUMERIC if vkey in _NUMERIC else {vkey}
    values = [v for k, v in given if k in keys]
    if not values:
        return False
    if operator == "=":
        return any(_equal(vkey, v, expected) for v in values)
    if operator == "!=":
        return not any(_equal(vkey, v, expected) for v in values)
    if operator in (">", "<", ">=", "<="):
        return any(_compare(operator, v, expected) for v in values)
    return False


def _equal(vkey: str | None, given: Any, expected: Any) -> bool:
    if vkey == "valueCoding":
        return isinstance(given, dict) and isinstance(expected, dict) and _coding_equal(expected, given)
    if vkey == "valueQuantity":
        return (
            isinstance(given, dict)
            and isinstance(expected, dict)
            and (
                _num(given.get("value")) == _num(expected.get("value"))
                and given.get("code", given.get("unit")) == expected.get("code", expected.get("unit"))
            )
        )
    if vkey in ("valueDecimal", "valueInteger"):
        return _num(given) is not None and _num(given) == _num(expected)
    return bool(given == expected)


def _compare(operator: str, given: Any, expected: Any) -> bool:
    left: Any
    right: Any
    if isinstance(given, dict) and isinstance(expected, dict):  # Quantity
        left, right = _num(given.get("value")), _num(expected.get("value"))
    elif isinstance(given, str) and isinstance(expected, str):  # date, dateTime, time, string
        left, right = given, expected
    else:
        left, right = _num(given), _num(expected)
    if left is None or right is None:
        return False
    if operator == ">":
        return bool(left > right)
    if operator == "<":
        return bool(left < right)
    if operator == ">=":
        return bool(left >= right)
    return bool(left <= right)


def _num(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


# --- required items -----------------------------------------------------------------------------------


def _check_required(
    ctx: _Context,
    response: dict[str, Any],
    closed_scales: frozenset[str],
    mapping: InstrumentMapping | None,
    issues: list[Issue],
) -> None:
    present = _present_link_ids(response.get("item", []))
    for link_id, q in ctx.items.items():
        if not q.item.get("required", False) or q.type == "display":
            continue
        if link_id in present or not _enabled(ctx, link_id):
            continue
        if q.parent is not None and not _ancestor_required_or_present(ctx, q.parent, present):
            # An optional group that was left out: its required children are required only inside it.
            continue
        if mapping is not None and closed_scales and _excused(mapping, link_id, closed_scales):
            continue
        issues.append(
            Issue(
                f"linkId {link_id!r} is required in {ctx.label} but has no answer",
                code="required",
                expression=(f"QuestionnaireResponse.item.where(linkId='{link_id}')",),
            )
        )


def _present_link_ids(items: list[dict[str, Any]]) -> set[str]:
    """linkIds that are answered, plus every group containing an answered descendant."""
    out: set[str] = set()

    def visit(its: list[dict[str, Any]]) -> bool:
        any_here = False
        for it in its:
            answered = False
            for ans in it.get("answer", []):
                if _value_of(ans) is not None:
                    answered = True
                if visit(ans.get("item", [])):
                    answered = True
            if visit(it.get("item", [])):
                answered = True
            if answered:
                out.add(str(it.get("linkId", "")))
                any_here = True
        return any_here

    visit(items)
    return out


def _ancestor_required_or_present(ctx: _Context, link_id: str, present: set[str]) -> bool:
    q = ctx.items[link_id]
    if link_id not in present and not q.item.get("required", False):
        return False
    return q.parent is None or _ancestor_required_or_present(ctx, q.parent, present)


def _excused(mapping: InstrumentMapping, link_id: str, closed_scales: frozenset[str]) -> bool:
    """A closed scale's items are not asked, except its trigger, which is asked every time."""
    try:
        scale = mapping.scale_of_item(link_id)
    except KeyError:
        return False
    return scale.code in closed_scales and link_id != scale.trigger
