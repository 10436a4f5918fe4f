"""Which mapping scores a response to which Questionnaire version (content is data; no I/O after loading).

Every file in ``<content dir>/mappings/*.yaml`` is loaded once at start-up. A mapping names the
Questionnaires it scores (``questionnaires.adaptive``/``static`` of a multi-scale instrument,
``questionnaire`` of a sum score); a canonical without ``|version`` means the Questionnaire version
equal to the mapping's own ``version``, and ``url|version`` pins another one. That pin is how a site's
calibrated mapping (``fhir-norse calibrate``: new reliabilities, new mapping version) keeps scoring the
same, unchanged Questionnaire version.

When several mappings score one Questionnaire version, the highest mapping version wins.

A Questionnaire of the pack that names a scored Questionnaire in ``derivedFrom`` (``url|version``) is
scored by the same mapping: the English forms (``nf21-static-en``, ``nf21-adaptive-en``) have the items and
codes of the bokmål ones, in their own language, because form fillers show ``text`` and ignore the
translation extension. :meth:`InstrumentRegistry.source_of` names the form a derived one comes from.

The displays of the pack's codes (``questionnaires/terminology/``, ``profiles/``) are loaded with the
mappings (:mod:`fhir_norse.instruments.terminology`) and travel with every :class:`Instrument`, so the
builders write the displays the content defines.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fhir_norse.canonicals import CS_ALERTS
from fhir_norse.instruments.schema import (
    ContentError,
    InstrumentMapping,
    SumScoreMapping,
    load_any_mapping,
)
from fhir_norse.instruments.terminology import Terminology, load_terminology

__all__ = ["DerivedForm", "Instrument", "InstrumentRegistry", "load_derived_forms", "version_key"]

AnyMapping = InstrumentMapping | SumScoreMapping
# The language of the texts the server writes (Flag and Task wording, report conclusions).
TEXT_LANGUAGE = "en"


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key for versions: numeric parts numerically (``2.10.0`` after ``2.9.0``), others as text."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in version.replace("-", ".").split("."))


@dataclass(frozen=True)
class Instrument:
    """One loaded mapping, the file it came from and the displays of the content pack's codes."""

    mapping: AnyMapping
    path: Path
    terminology: Terminology = field(default_factory=Terminology, compare=False)

    @property
    def code(self) -> str:
        return self.mapping.instrument

    @property
    def version(self) -> str:
        return self.mapping.version

    @property
    def is_multiscale(self) -> bool:
        return isinstance(self.mapping, InstrumentMapping)

    def questionnaires(self) -> Iterator[tuple[str, str]]:
        """``(url, version)`` of every Questionnaire this mapping scores."""
        if isinstance(self.mapping, InstrumentMapping):
            canonicals = [self.mapping.questionnaires.adaptive, self.mapping.questionnaires.static]
        else:
            canonicals = [self.mapping.questionnaire]
        for canonical in canonicals:
            url, _, pinned = canonical.partition("|")
            yield url, pinned or self.mapping.version

    def alert_display(self, code: str) -> str | None:
        """The display of alert ``code`` (CodeSystem ``rom-alerts``) in the server's text language."""
        return self.terminology.display(CS_ALERTS, code, TEXT_LANGUAGE)


@dataclass(frozen=True)
class DerivedForm:
    """A Questionnaire of the pack (``url|version``) derived from another one (``source``: its
    ``derivedFrom``), with the same items and codes."""

    url: str
    version: str
    source_url: str
    source_version: str


def load_derived_forms(root: Path) -> list[DerivedForm]:
    """The Questionnaires under ``root/questionnaires`` that name a ``url|version`` in ``derivedFrom``
    (raises :class:`ContentError` naming a file that is not readable JSON)."""
    folder = Path(root) / "questionnaires"
    out = []
    for path in sorted(folder.rglob("Questionnaire-*.json")) if folder.is_dir() else ():
        if "source" in path.relative_to(folder).parts[:-1]:
            continue
        try:
            body: Any = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ContentError(path.relative_to(root).as_posix(), [f"not readable JSON: {exc}"]) from exc
        if not isinstance(body, dict) or not isinstance(body.get("url"), str):
            continue
        for canonical in (body.get("derivedFrom") or [])[:1]:
            source_url, _, source_version = str(canonical).partition("|")
            if source_version:
                out.append(DerivedForm(body["url"], str(body.get("version")), source_url, source_version))
    return out


class InstrumentRegistry:
    """Mappings by the Questionnaire ``url|version`` they score, and the content's terminology."""

    def __init__(
        self,
        instruments: Iterable[Instrument] = (),
        terminology: Terminology | None = None,
        derived: Iterable[DerivedForm] = (),
    ) -> None:
        """With ``terminology``, every instrument carries it (instead of the one it was made with);
        ``derived`` forms are scored by the mapping of the form they derive from."""
        if terminology is not None:
            instruments = [replace(i, terminology=terminology) for i in instruments]
        self.terminology = terminology if terminology is not None else Terminology()
        self._all = tuple(instruments)
        self._by_questionnaire: dict[tuple[str, str], Instrument] = {}
        for inst in sorted(self._all, key=lambda i: version_key(i.version)):
            for key in inst.questionnaires():
                self._by_questionnaire[key] = inst  # a higher mapping version replaces a lower one
        self._sources: dict[tuple[str, str], tuple[str, str]] = {}
        for form in derived:
            source = (form.source_url, form.source_version)
            scoring = self._by_questionnaire.get(source)
            if scoring is not None and (form.url, form.version) not in self._by_questionnaire:
                self._by_questionnaire[(form.url, form.version)] = scoring
                self._sources[(form.url, form.version)] = source

    @classmethod
    def from_content_dir(cls, root: Path) -> InstrumentRegistry:
        """Load ``root/mappings/*.yaml`` and the terminology of the pack; raises :class:`ContentError`
        naming a broken file."""
        terminology = load_terminology(Path(root))
        folder = Path(root) / "mappings"
        if not folder.is_dir():
            return cls(terminology=terminology)
        instruments = [Instrument(load_any_mapping(p), p) for p in sorted(folder.glob("*.yaml"))]
        seen: dict[tuple[str, str], Path] = {}
        for inst in instruments:
            key = (inst.code, inst.version)
            if key in seen:
                raise ContentError(
                    str(inst.path), [f"{inst.code} {inst.version} is also defined in {seen[key].name}"]
                )
            seen[key] = inst.path
        return cls(instruments, terminology, load_derived_forms(Path(root)))

    def __iter__(self) -> Iterator[Instrument]:
        return iter(self._all)

    def __len__(self) -> int:
        return len(self._all)

    def for_questionnaire(self, url: str, version: str | None) -> Instrument | None:
        """The mapping that scores Questionnaire ``url|version`` (``None``: not a scored instrument)."""
        if version is None:
            return None
        return self._by_questionnaire.get((url, version))

    def source_of(self, url: str, version: str | None) -> tuple[str, str | None]:
        """The ``(url, version)`` of the form a derived form of the pack comes from (itself for any
        other): what the adaptive operations compare with the mapping's static and adaptive forms."""
        return self._sources.get((url, str(version)), (url, version))

    def scores_url(self, url: str) -> bool:
        """Whether any mapping scores some version of the Questionnaire ``url``."""
        return any(u == url for u, _ in self._by_questionnaire)
