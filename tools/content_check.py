"""``fhir-norse content check``: validate every content file before the server loads it.

Checks, per file:

* every JSON resource under ``questionnaires/`` and ``profiles/`` is valid R4
  (:func:`fhir_norse.server.validation.validate_resource`);
* Questionnaires satisfy the R4 invariants que-0 to que-13
  (https://hl7.org/fhir/R4/questionnaire.html#invs), every ``enableWhen`` points at an earlier
  question and at one of its answer options, every coded answer and item code exists in its
  project CodeSystem, and every text and display of a non-English form has an English
  ``translation`` (https://hl7.org/fhir/R4/extension-translation.html);
* mappings (``mappings/*.yaml``) load through their schema, match their Questionnaires' url and
  version, place every item in exactly one scale or group, and (for the static form) open every
  scale exactly on the answers above its threshold; sum-score mappings score every answer option;
* a Questionnaire derived from one of the pack (``derivedFrom``, such as the English forms) has its
  items and codes, only the wording may differ, since the same mapping scores it;
* every profile carries the snapshot :mod:`tools.snapshots` generates from its differential;
* every SearchParameter has a canonical under the project base, an expression the server indexes, and
  defines no parameter R4 defines already (:func:`fhir_norse.store.search.params.custom_problems`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fhir_norse.canonicals import BASE
from fhir_norse.instruments.registry import version_key
from fhir_norse.instruments.schema import (
    ContentError,
    InstrumentMapping,
    SumScoreMapping,
    load_any_mapping,
)
from fhir_norse.outcomes import BadRequest
from fhir_norse.server.search.extract import UnsupportedExpression, compile_expression, rewrite_expression
from fhir_norse.server.validation import validate_resource
from fhir_norse.store.search.params import custom_problems, restrict_expression
from tools.content_build import ORDINAL_VALUE, TRANSLATION, trigger_codes_above
from tools.snapshots import SnapshotError, differential_problems, generate_snapshot

__all__ = ["Problem", "check_content", "main"]

CONTENT_DIRS = ("questionnaires", "profiles")
NOT_RESOURCES = {"package.json", ".index.json"}
NF_ITEM_EXTENSION = "StructureDefinition/nf21-item"
# What a derived form may word differently from the form it derives from.
_WORDING = frozenset({"text", "_text", "display", "_display", "prefix", "_prefix"})

_ANSWER_TYPES = {
    "choice",
    "open-choice",
    "decimal",
    "integer",
    "date",
    "dateTime",
    "time",
    "string",
    "quantity",
}
_MAX_LENGTH_TYPES = {"boolean", "decimal", "integer", "string", "text", "url", "open-choice"}


@dataclass(frozen=True, slots=True)
class Problem:
    """One content problem: the file (relative to the content root), where in it, and what."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.message}" if self.path else f"{self.file}: {self.message}"


@dataclass(slots=True)
class _Resource:
    file: str
    body: dict[str, Any]


def _walk(
    items: list[dict[str, Any]], parents: tuple[dict[str, Any], ...] = ()
) -> Iterator[tuple[dict[str, Any], tuple[dict[str, Any], ...]]]:
    for item in items:
        yield item, parents
        yield from _walk(item.get("item", []), (*parents, item))


def _where(item: dict[str, Any]) -> str:
    return f"item[{item.get('linkId', '?')}]"


def _has_translation(element: Any, lang: str = "en") -> bool:
    if not isinstance(element, dict):
        return False
    for ext in element.get("extension", []):
        if ext.get("url") != TRANSLATION:
            continue
        subs = {e.get("url"): e for e in ext.get("extension", [])}
        if subs.get("lang", {}).get("valueCode") == lang and subs.get("content", {}).get("valueString"):
            return True
    return False


class _Checker:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.problems: list[Problem] = []
        self.resources: list[_Resource] = []
        self.code_systems: dict[str, set[str]] = {}
        self.value_sets: dict[str, dict[str, Any]] = {}
        # Questionnaires by ``url|version``: a pack publishes several versions of one form.
        self.questionnaires: dict[str, _Resource] = {}
        self.base = BASE

    def add(self, file: str, path: str, message: str) -> None:
        self.problems.append(Problem(file, path, message))

    # files -----------------------------------------------------------------------------------------

    def load(self) -> None:
        for folder in CONTENT_DIRS:
            directory = self.root / folder
            if not directory.is_dir():
                continue
            for path in sorted(directory.rglob("*.json")):
                if path.name in NOT_RESOURCES or "node_modules" in path.parts:
                    continue
                rel = path.relative_to(self.root).as_posix()
                try:
                    body = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    self.add(rel, "", f"not readable JSON: {exc}")
                    continue
                try:
                    validate_resource(body)
                except BadRequest as exc:
                    for issue in exc.issues:
                        self.add(rel, ", ".join(issue.expression), f"not valid R4: {issue.diagnostics}")
                if not isinstance(body, dict):
                    continue
                res = _Resource(rel, body)
                self.resources.append(res)
                rtype, url = body.get("resourceType"), body.get("url")
                if rtype == "CodeSystem" and isinstance(url, str):
                    self.code_systems[url] = set(self._codes(body.get("concept", [])))
                elif rtype == "ValueSet" and isinstance(url, str):
                    self.value_sets[url] = body
                elif rtype == "Questionnaire" and isinstance(url, str):
                    canonical = f"{url}|{body.get('version')}"
                    if canonical in self.questionnaires:
                        self.add(
                            rel, "url", f"{canonical} is also used by {self.questionnaires[canonical].file}"
                        )
                    self.questionnaires[canonical] = res

    def _codes(self, concepts: list[dict[str, Any]]) -> Iterator[str]:
        for c in concepts:
            if isinstance(c.get("code"), str):
                yield c["code"]
            yield from self._codes(c.get("concept", []))

    # terminology -----------------------------------------------------------------------------------

    def check_terminology(self) -> None:
        for res in self.resources:
            body = res.body
            if body.get("resourceType") == "CodeSystem":
                codes = list(self._codes(body.get("concept", [])))
                if len(codes) != len(set(codes)):
                    self.add(res.file, "concept", "a code is defined twice")
                if "count" in body and body["count"] != len(codes):
                    self.add(res.file, "count", f"is {body['count']}, but {len(codes)} concepts are defined")
                if body.get("language", "en") != "en":
                    for c in body.get("concept", []):
                        if not any(d.get("language") == "en" for d in c.get("designation", [])):
                            self.add(res.file, f"concept[{c.get('code')}]", "has no English designation")
            elif body.get("resourceType") == "ValueSet":
                for i, inc in enumerate(body.get("compose", {}).get("include", [])):
                    system = inc.get("system")
                    if not isinstance(system, str):
                        continue
                    if system.startswith(self.base) and system not in self.code_systems:
                        self.add(res.file, f"compose.include[{i}].system", f"unknown CodeSystem {system}")
                    known = self.code_systems.get(system)
                    for c in inc.get("concept", []):
                        if known is not None and c.get("code") not in known:
                            self.add(
                                res.file, f"compose.include[{i}]", f"code {c.get('code')!r} not in {system}"
                            )

    def _check_coding(self, file: str, where: str, coding: dict[str, Any]) -> None:
        system, code = coding.get("system"), coding.get("code")
        if not isinstance(system, str):
            return
        if system in self.code_systems:
            if code not in self.code_systems[system]:
                self.add(file, where, f"code {code!r} is not in CodeSystem {system}")
        elif system.startswith(self.base):
            self.add(file, where, f"unknown CodeSystem {system}")

    # questionnaires --------------------------------------------------------------------------------

    def check_questionnaire(self, res: _Resource) -> None:
        q, f = res.body, res.file
        name = q.get("name")
        if isinstance(name, str) and not (name[:1].isupper() and name.replace("_", "").isalnum()):
            self.add(f, "name", "que-0: name should be usable as an identifier")
        needs_en = q.get("language", "en") != "en"
        if needs_en and "title" in q and not _has_translation(q.get("_title")):
            self.add(f, "title", "has no English translation")
        order: dict[str, int] = {}
        items_by_id: dict[str, dict[str, Any]] = {}
        walked = list(_walk(q.get("item", [])))
        for n, (item, _) in enumerate(walked):
            link_id = str(item.get("linkId"))
            if link_id in order:
                self.add(f, _where(item), f"que-2: linkId {link_id!r} is not unique")
            else:
                order[link_id] = n
                items_by_id[link_id] = item
        for n, (item, _) in enumerate(walked):
            self._check_item(f, item, needs_en)
            for i, ew in enumerate(item.get("enableWhen", [])):
                where = f"{_where(item)}.enableWhen[{i}]"
                target = ew.get("question")
                if target not in order:
                    self.add(f, where, f"question {target!r} is not an item of this Questionnaire")
                    continue
                if order[target] >= n:
                    self.add(f, where, f"question {target!r} does not come before this item")
                coding = ew.get("answerCoding")
                options = items_by_id[target].get("answerOption")
                if isinstance(coding, dict) and options:
                    allowed = {
                        (o["valueCoding"].get("system"), o["valueCoding"].get("code"))
                        for o in options
                        if "valueCoding" in o
                    }
                    if (coding.get("system"), coding.get("code")) not in allowed:
                        self.add(
                            f, where, f"answer {coding.get('code')!r} is not an answer option of {target!r}"
                        )

    def _check_item(self, f: str, item: dict[str, Any], needs_en: bool) -> None:
        w = _where(item)
        t = item.get("type")
        has_items = bool(item.get("item"))
        if t == "group" and not has_items:
            self.add(f, w, "que-1: a group must have nested items")
        if t == "display" and has_items:
            self.add(f, w, "que-1: a display item cannot have nested items")
        if t == "display" and item.get("code"):
            self.add(f, w, "que-3: a display item cannot have a code")
        if item.get("answerOption") and item.get("answerValueSet"):
            self.add(f, w, "que-4: cannot have both answerOption and answerValueSet")
        if (item.get("answerOption") or item.get("answerValueSet")) and t not in _ANSWER_TYPES:
            self.add(f, w, f"que-5: a {t} item cannot have answer options")
        if t == "display" and ("required" in item or "repeats" in item):
            self.add(f, w, "que-6: required and repeats are not permitted on display items")
        for i, ew in enumerate(item.get("enableWhen", [])):
            if ew.get("operator") == "exists" and "answerBoolean" not in ew:
                self.add(f, f"{w}.enableWhen[{i}]", "que-7: operator 'exists' needs answerBoolean")
        if t in ("group", "display") and item.get("initial"):
            self.add(f, w, "que-8: groups and display items cannot have initial values")
        if t == "display" and "readOnly" in item:
            self.add(f, w, "que-9: readOnly is not permitted on display items")
        if "maxLength" in item and t not in _MAX_LENGTH_TYPES:
            self.add(f, w, f"que-10: maxLength is not permitted on {t} items")
        if item.get("answerOption") and item.get("initial"):
            self.add(f, w, "que-11: initial cannot be present with answerOption")
        if len(item.get("enableWhen", [])) > 1 and "enableBehavior" not in item:
            self.add(f, w, "que-12: more than one enableWhen needs enableBehavior")
        if len(item.get("initial", [])) > 1 and item.get("repeats") is not True:
            self.add(f, w, "que-13: only repeating items can have more than one initial value")
        if needs_en and "text" in item and not _has_translation(item.get("_text")):
            self.add(f, f"{w}.text", "has no English translation")
        for i, code in enumerate(item.get("code", [])):
            self._check_coding(f, f"{w}.code[{i}]", code)
        vs = item.get("answerValueSet")
        if isinstance(vs, str) and vs.startswith(self.base) and vs.split("|")[0] not in self.value_sets:
            self.add(f, f"{w}.answerValueSet", f"unknown ValueSet {vs}")
        for i, opt in enumerate(item.get("answerOption", [])):
            coding = opt.get("valueCoding")
            if not isinstance(coding, dict):
                continue
            where = f"{w}.answerOption[{i}]"
            self._check_coding(f, where, coding)
            if needs_en and "display" in coding and not _has_translation(coding.get("_display")):
                self.add(f, f"{where}.display", "has no English translation")

    # mappings --------------------------------------------------------------------------------------

    def check_mappings(self) -> None:
        directory = self.root / "mappings"
        if not directory.is_dir():
            return
        for path in sorted(directory.glob("*.yaml")):
            rel = path.relative_to(self.root).as_posix()
            try:
                mapping = load_any_mapping(path)
            except ContentError as exc:
                for problem in exc.problems:
                    field, _, message = problem.partition(": ")
                    self.add(rel, field, message)
                continue
            if isinstance(mapping, InstrumentMapping):
                self._check_instrument(rel, mapping)
            else:
                self._check_sum_score(rel, mapping)

    def _questionnaire(self, file: str, field: str, canonical: str, version: str) -> _Resource | None:
        url, _, pinned = canonical.partition("|")
        expected = pinned or version
        res = self.questionnaires.get(f"{url}|{expected}")
        if res is None:
            others = sorted(
                str(r.body.get("version")) for k, r in self.questionnaires.items() if k.split("|")[0] == url
            )
            if others:
                self.add(file, field, f"version {expected} but the pack has {url} in version(s) {others}")
            else:
                self.add(file, field, f"no Questionnaire with url {url}")
        return res

    def _check_instrument(self, rel: str, m: InstrumentMapping) -> None:
        scale_of = {i: s for s in m.scales for i in s.items}
        reverse = {i for s in m.scales for i in s.reverse_keyed}
        expected_ids = set(m.all_link_ids())
        answer_codes = set(m.answer_handling.codes())
        for kind, canonical in (("static", m.questionnaires.static), ("adaptive", m.questionnaires.adaptive)):
            res = self._questionnaire(rel, f"questionnaires.{kind}", canonical, m.version)
            if res is None:
                continue
            f = res.file
            walked = list(_walk(res.body.get("item", [])))
            questions = {i["linkId"]: (i, p) for i, p in walked if i.get("type") not in ("group", "display")}
            for link_id in sorted(set(questions) - expected_ids):
                self.add(f, f"item[{link_id}]", f"is in no scale or group of {rel}")
            for link_id in sorted(expected_ids - set(questions)):
                self.add(rel, link_id, f"has no item in {f}")
            for link_id, (item, parents) in questions.items():
                scale = scale_of.get(link_id)
                if scale is None:
                    continue
                codes = {o.get("valueCoding", {}).get("code") for o in item.get("answerOption", [])}
                if codes != answer_codes:
                    self.add(
                        f,
                        f"item[{link_id}].answerOption",
                        f"codes {sorted(map(str, codes))} differ from {rel}",
                    )
                self._check_item_extension(f, item, scale.code, scale.trigger == link_id, link_id in reverse)
                if kind != "static":
                    continue
                gates = [p for p in parents if p.get("enableWhen")] + (
                    [item] if item.get("enableWhen") else []
                )
                if link_id == scale.trigger:
                    if gates:
                        self.add(f, f"item[{link_id}]", "a trigger must always be shown (it has enableWhen)")
                    continue
                self._check_gate(f, m, scale, link_id, gates, reverse)

    def _check_gate(
        self,
        f: str,
        m: InstrumentMapping,
        scale: Any,
        link_id: str,
        gates: list[dict[str, Any]],
        reverse: set[str],
    ) -> None:
        trigger = m.trigger_of(scale)
        expected = set(
            trigger_codes_above(
                scale.open_if_trigger_gt, trigger in reverse, m.answer_handling.min, m.answer_handling.max
            )
        )
        if len(gates) != 1:
            self.add(f, f"item[{link_id}]", f"must be enabled by exactly one enableWhen set on {trigger!r}")
            return
        gate = gates[0]
        conditions = gate["enableWhen"]
        actual = {c.get("answerCoding", {}).get("code") for c in conditions}
        ok = (
            all(c.get("question") == trigger and c.get("operator") == "=" for c in conditions)
            and (len(conditions) == 1 or gate.get("enableBehavior") == "any")
            and actual == expected
        )
        if not ok:
            self.add(
                f,
                f"{_where(gate)}.enableWhen",
                f"must open {scale.code} when {trigger} is one of {sorted(expected)} "
                f"(problem-direction score > {scale.open_if_trigger_gt:g}), enableBehavior any",
            )

    def _check_item_extension(
        self, f: str, item: dict[str, Any], scale: str, trigger: bool, rev: bool
    ) -> None:
        for ext in item.get("extension", []):
            if not str(ext.get("url", "")).endswith(NF_ITEM_EXTENSION):
                continue
            subs = {e.get("url"): e for e in ext.get("extension", [])}
            found = (
                subs.get("scale", {}).get("valueCoding", {}).get("code"),
                subs.get("trigger", {}).get("valueBoolean"),
                subs.get("reverseKeyed", {}).get("valueBoolean"),
            )
            if found != (scale, trigger, rev):
                self.add(
                    f,
                    f"{_where(item)}.extension",
                    f"nf21-item says {found}, the mapping {(scale, trigger, rev)}",
                )
            return
        self.add(
            f, f"{_where(item)}.extension", "has no nf21-item extension (scale, trigger, reverse keying)"
        )

    def _check_sum_score(self, rel: str, m: SumScoreMapping) -> None:
        res = self._questionnaire(rel, "questionnaire", m.questionnaire, m.version)
        if res is None:
            return
        items = {i.get("linkId"): i for i, _ in _walk(res.body.get("item", []))}
        scores = m.total.scores()
        for n, link_id in enumerate(m.total.items):
            item = items.get(link_id)
            if item is None:
                self.add(rel, f"total.items[{n}]", f"{link_id!r} is not an item of {res.file}")
                continue
            for opt in item.get("answerOption", []):
                code = opt.get("valueCoding", {}).get("code")
                if code not in scores:
                    self.add(rel, "total.answer_scores", f"no score for answer {code!r} of item {link_id!r}")
                    continue
                for ext in opt.get("extension", []) + opt.get("valueCoding", {}).get("extension", []):
                    if ext.get("url") == ORDINAL_VALUE and ext.get("valueDecimal") != scores[code]:
                        self.add(
                            res.file,
                            f"item[{link_id}].answerOption[{code}]",
                            f"ordinalValue {ext.get('valueDecimal')} differs from {rel} ({scores[code]:g})",
                        )
        for n, alert in enumerate(m.alerts):
            if isinstance(alert, dict) and "item" in alert and alert["item"] not in items:
                self.add(rel, f"alerts[{n}].item", f"{alert['item']!r} is not an item of {res.file}")

    # derived forms, profiles, search parameters ------------------------------------------------

    def check_derived_form(self, res: _Resource) -> None:
        """A form derived from a form of the pack has its items, codes and answer options (module doc)."""
        for canonical in (res.body.get("derivedFrom") or [])[:1]:
            url, _, version = str(canonical).partition("|")
            versions = {
                k.split("|", 1)[1]: r for k, r in self.questionnaires.items() if k.split("|")[0] == url
            }
            if not versions:
                continue
            source = versions.get(version) if version else versions[max(versions, key=version_key)]
            if source is None:
                self.add(res.file, "derivedFrom", f"{canonical}: the pack has versions {sorted(versions)}")
                continue
            mine = [_structure(i) for i, _ in _walk(res.body.get("item", []))]
            theirs = [_structure(i) for i, _ in _walk(source.body.get("item", []))]
            for n, (a, b) in enumerate(zip(mine, theirs, strict=False)):
                if a != b:
                    self.add(
                        res.file,
                        f"item[{a.get('linkId')}]",
                        f"differs from item {n} of {source.file} (not only in wording)",
                    )
                    return
            if len(mine) != len(theirs):
                self.add(res.file, "item", f"has {len(mine)} items, {source.file} {len(theirs)}")

    def check_profile(self, res: _Resource) -> None:
        for problem in differential_problems(res.body):
            self.add(res.file, "snapshot", problem)
        try:
            fresh = generate_snapshot(res.body)
        except SnapshotError as exc:
            self.add(res.file, "snapshot", str(exc))
            return
        if res.body.get("snapshot") != fresh:
            self.add(res.file, "snapshot", "is not the generated one: run `python -m tools.snapshots`")

    def check_search_parameter(self, res: _Resource) -> None:
        sp, f = res.body, res.file
        url = sp.get("url")
        if (
            isinstance(url, str)
            and url.startswith(self.base)
            and url != f"{self.base}/SearchParameter/{sp.get('id')}"
        ):
            self.add(f, "url", f"should be {self.base}/SearchParameter/{sp.get('id')}")
        for problem in custom_problems(sp):
            self.add(f, "", problem)
        expression = sp.get("expression")
        if not isinstance(expression, str):
            return
        for base in sp.get("base") or []:
            if restrict_expression(expression, str(base)) is None:
                self.add(f, "expression", f"has no branch for base {base}")
        try:
            compile_expression(rewrite_expression(expression))
        except UnsupportedExpression as exc:
            self.add(f, "expression", f"cannot be indexed: {exc}")

    def run(self) -> list[Problem]:
        self.load()
        self.check_terminology()
        checks = {
            "Questionnaire": [self.check_questionnaire, self.check_derived_form],
            "StructureDefinition": [self.check_profile],
            "SearchParameter": [self.check_search_parameter],
        }
        for res in self.resources:
            for check in checks.get(str(res.body.get("resourceType")), []):
                check(res)
        self.check_mappings()
        return self.problems


def _structure(item: dict[str, Any]) -> Any:
    """An item without its wording and without its children (they are walked one by one)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in _WORDING}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip({k: v for k, v in item.items() if k != "item"})


def check_content(root: Path) -> list[Problem]:
    """Every problem in the content under ``root`` (``questionnaires/``, ``profiles/``, ``mappings/``)."""
    return _Checker(root).run()


def main(root: Path | None = None) -> int:
    """Print every problem; return 0 if the content is clean, else 1 (``python -m tools.content_check``)."""
    root = root or Path(__file__).resolve().parents[1]
    problems = check_content(root)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} content problem(s)", file=sys.stderr)
        return 1
    print("content check: OK")
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tools.content_check", description="validate every file of a content pack"
    )
    parser.add_argument("--content-dir", help="the content pack (default: this checkout)")
    args = parser.parse_args()
    sys.exit(main(Path(args.content_dir) if args.content_dir else None))
