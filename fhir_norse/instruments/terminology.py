"""Displays of the codes the content pack defines, so builders take them from content, not from code.

Sources (https://hl7.org/fhir/R4/codesystem.html, https://hl7.org/fhir/R4/valueset.html):

* every ``CodeSystem`` concept (nested ones too): its ``display``, written in the CodeSystem's
  ``language``, and its ``designation`` values by language;
* every ``ValueSet.compose.include.concept`` with a ``display``, for systems the pack does not define
  itself (LOINC panel codes in ``ValueSet-rom-panels.json``); a CodeSystem's own display always wins.

:meth:`Terminology.from_resources` is pure (resource dicts in). :func:`load_terminology` reads the
``CodeSystem-*.json`` and ``ValueSet-*.json`` files of a content dir; it runs when the caller asks
(``InstrumentRegistry.from_content_dir`` at start-up), never at import time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhir_norse.instruments.schema import ContentError

__all__ = ["Concept", "Terminology", "load_terminology"]

# Folders of a content pack that hold FHIR resources; ``source`` folders hold authoring files.
_CONTENT_FOLDERS = ("questionnaires", "profiles")
_SKIP_DIRS = frozenset({"source"})
_PREFIXES = ("CodeSystem-", "ValueSet-")


@dataclass(frozen=True)
class Concept:
    """The display of one code and its designations (language -> value, the first of each)."""

    display: str | None
    language: str | None = None
    designations: Mapping[str, str] = field(default_factory=dict)


def _concepts(concepts: Any) -> Iterator[Mapping[str, Any]]:
    for concept in concepts if isinstance(concepts, list) else ():
        if isinstance(concept, Mapping):
            yield concept
            yield from _concepts(concept.get("concept"))


def _designations(concept: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for designation in concept.get("designation") or ():
        if not isinstance(designation, Mapping):
            continue
        language, value = designation.get("language"), designation.get("value")
        if isinstance(language, str) and isinstance(value, str):
            out.setdefault(language, value)
    return out


def _included(value_set: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(system, concept)`` of every concept a ValueSet's ``compose.include`` lists by code."""
    for include in (value_set.get("compose") or {}).get("include") or ():
        system = include.get("system") if isinstance(include, Mapping) else None
        if not isinstance(system, str):
            continue
        for concept in include.get("concept") or ():
            if isinstance(concept, Mapping) and isinstance(concept.get("code"), str):
                yield system, concept


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class Terminology:
    """``(system, code) -> Concept`` for the codes of the content pack."""

    def __init__(self, concepts: Mapping[tuple[str, str], Concept] | None = None) -> None:
        self._concepts: dict[tuple[str, str], Concept] = dict(concepts or {})

    @classmethod
    def from_resources(cls, resources: Iterable[Mapping[str, Any]]) -> Terminology:
        """CodeSystem concepts, then ValueSet compose concepts of systems no CodeSystem defined."""
        own: dict[tuple[str, str], Concept] = {}
        listed: dict[tuple[str, str], Concept] = {}
        for resource in resources:
            language = _text(resource.get("language"))
            if resource.get("resourceType") == "CodeSystem" and isinstance(resource.get("url"), str):
                for concept in _concepts(resource.get("concept")):
                    if isinstance(concept.get("code"), str):
                        own[(resource["url"], concept["code"])] = Concept(
                            _text(concept.get("display")), language, _designations(concept)
                        )
            elif resource.get("resourceType") == "ValueSet":
                for system, concept in _included(resource):
                    if isinstance(concept.get("display"), str):
                        listed.setdefault(
                            (system, concept["code"]),
                            Concept(concept["display"], language, _designations(concept)),
                        )
        defined = {system for system, _ in own}
        merged = {key: c for key, c in listed.items() if key[0] not in defined}
        merged.update(own)
        return cls(merged)

    def __len__(self) -> int:
        return len(self._concepts)

    def concept(self, system: str, code: str) -> Concept | None:
        return self._concepts.get((system, code))

    def display(self, system: str, code: str, language: str | None = None) -> str | None:
        """The display of ``system#code``: its designation in ``language`` when it has one, else its
        display (``None``: the content pack does not know the code or gives it no display)."""
        concept = self._concepts.get((system, code))
        if concept is None:
            return None
        if language is not None and language != concept.language and language in concept.designations:
            return concept.designations[language]
        return concept.display


def _content_files(root: Path) -> Iterator[Path]:
    for folder in _CONTENT_FOLDERS:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.json")):
            if path.name.startswith(_PREFIXES) and not _SKIP_DIRS.intersection(
                path.relative_to(base).parts[:-1]
            ):
                yield path


def load_terminology(root: Path) -> Terminology:
    """The terminology of the content pack at ``root``; raises :class:`ContentError` naming a file
    that is not readable JSON."""
    resources: list[Mapping[str, Any]] = []
    for path in _content_files(Path(root)):
        name = path.relative_to(root).as_posix()
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ContentError(name, [f"cannot read: {exc.strerror}"]) from exc
        except ValueError as exc:
            raise ContentError(name, [f"not valid JSON: {exc}"]) from exc
        if isinstance(body, dict):
            resources.append(body)
    return Terminology.from_resources(resources)
