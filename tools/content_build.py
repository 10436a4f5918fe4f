"""Generate the Norse Feedback FHIR content from the item source and the mapping.

Inputs (data, committed): ``questionnaires/source/nf21-items.yaml`` (wording, bokmål + English) and
every ``mappings/nf21-<version>.yaml`` (structure, thresholds, norms; each version picks its items from
the source by linkId). Outputs (generated, committed, pretty JSON, byte-identical on every run), for
every mapping version, so a published version stays published when a new one is added:

* ``questionnaires/terminology/CodeSystem-*.json`` and ``ValueSet-*.json``
  (https://hl7.org/fhir/R4/codesystem.html, https://hl7.org/fhir/R4/valueset.html): one file per code
  system, holding the codes of every mapping version (a response to an older version keeps valid codes).
  A code the newest version no longer asks stays, with concept property ``status`` = ``retired``. An
  instrument code system's version is the first mapping version at which its content took its present
  form (``nf21-items`` 2.2.0, since 2.2.0 added items; ``nf21-scales`` stays 2.1.0);
* ``questionnaires/nf21/Questionnaire-nf21-static.json``: an R4 Questionnaire any SDC form filler can
  administer (https://hl7.org/fhir/R4/questionnaire.html): the triggers first, then one group per scale
  enabled by ``enableWhen`` on its trigger, then alliance, preferences, single and medication items;
* ``questionnaires/nf21/Questionnaire-nf21-adaptive.json``: the same items as an SDC adaptive
  Questionnaire (https://hl7.org/fhir/uv/sdc/adaptive.html) for ``$next-question``;
* ``questionnaires/nf21/Questionnaire-nf21-static-en.json`` and ``...-nf21-adaptive-en.json``: the same two
  forms in English, each its own Questionnaire (``language`` en, canonical ``<form>-en``, ``derivedFrom``
  the bokmål form's ``url|version``, same items, codes and answer options). Form fillers show ``text``
  and ignore the translation extension, so a form in another language has to be a form of its own; the
  server scores a response to it with the bokmål form's mapping
  (:class:`fhir_norse.instruments.registry.InstrumentRegistry`).

The Questionnaires of the first version (2.1.0) keep the file names they were published under
(``Questionnaire-nf21-static.json``); every later version is written beside them with its version in the
name (``Questionnaire-nf21-static-2.2.0.json``), same ``id`` and ``url``, its own ``version``: the server
stores each ``url|version`` as a resource of its own (:mod:`fhir_norse.server.content`).

Decisions:

* No item is ``required``: "prefer not to answer" is an explicit answer, and a form filler must be able
  to submit an administration the patient stopped early; the scoring treats unanswered as missing.
* The adaptive form carries ``sdc-questionnaire-questionnaireAdaptive`` as ``valueBoolean: true``
  (SDC 3.0 allows boolean or url): the content does not know the base URL of the server that will
  serve ``$next-question``.
* Scale, domain, trigger and reverse keying are readable from each item through the
  ``http://fhir-norse.org/fhir/StructureDefinition/nf21-item`` extension; answers keep their raw 1-7
  ``ordinalValue`` (reversal happens in scoring, per the mapping).

``mapping`` subcommand: write the mapping file once from ``nf21-scales.csv`` (the numbers) and the
item source (the linkIds of the non-scale items); afterwards the committed mapping is the source.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import yaml

from fhir_norse.canonicals import BASE
from fhir_norse.instruments.registry import version_key
from fhir_norse.instruments.schema import (
    InstrumentMapping,
    ItemSource,
    Scale,
    SourceItem,
    load_item_source,
    load_mapping,
)

__all__ = [
    "build",
    "generate_mapping",
    "load_mappings",
    "main",
    "questionnaire_file",
    "terminology",
    "trigger_codes_above",
    "write_json",
]

TRANSLATION = "http://hl7.org/fhir/StructureDefinition/translation"
ORDINAL_VALUE = "http://hl7.org/fhir/StructureDefinition/ordinalValue"
SDC_ADAPT_PROFILE = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-adapt"
SDC_ADAPTIVE = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-questionnaireAdaptive"
PROJECT_TERMINOLOGY_VERSION = "1.0.0"
# Project code systems whose content changed since 1.0.0 (issue 13: the elevated range, closed; issue 19:
# not on track, the expected-recovery range).
PROJECT_CODE_SYSTEM_VERSIONS = {"rom-interpretation": "1.2.0", "rom-alerts": "1.1.0"}

ITEMS_SOURCE = Path("questionnaires/source/nf21-items.yaml")
MAPPING = Path("mappings/nf21-2.1.0.yaml")  # what the one-off ``mapping`` subcommand writes
MAPPINGS_DIR = Path("mappings")
MAPPINGS_GLOB = "nf21-*.yaml"
# The version whose Questionnaire files carry no version in their name (module doc).
UNVERSIONED_FILE_VERSION = "2.1.0"
CONCEPT_STATUS = "http://hl7.org/fhir/concept-properties#status"
TERMINOLOGY_DIR = Path("questionnaires/terminology")
NF21_DIR = Path("questionnaires/nf21")

# Project terminology that is not instrument content: (code, nb, en, definition).
_Concept = tuple[str, str, str, str]
PROJECT_CODE_SYSTEMS: dict[str, tuple[str, str, list[_Concept]]] = {
    "preference-values": (
        "PreferenceValues",
        "Therapy preference values",
        [],  # labels come from the item source
    ),
    "administration-context": (
        "AdministrationContext",
        "Administration context",
        [
            ("intake", "Inntak", "Intake", "First administration, at the start of treatment."),
            (
                "weekly",
                "Ukentlig",
                "Weekly",
                "Routine administration during treatment (weekly or per session).",
            ),
            ("termination", "Avslutning", "Termination", "Administration at the end of treatment."),
        ],
    ),
    "rom-interpretation": (
        "RomInterpretation",
        "Routine outcome monitoring interpretations",
        [
            (
                "elevated",
                "Forhøyet",
                "Elevated",
                "The score is in the scale's elevated range: at or above the mapping's elevated_from (by "
                "default the scale's closing threshold), the referenceRange of type elevated-range.",
            ),
            (
                "within-range",
                "Innenfor normalområdet",
                "Within range",
                "The score is below the scale's elevated range.",
            ),
            (
                "elevated-range",
                "Forhøyet område",
                "Elevated range",
                "Reference range type: the scale's elevated range, from elevated_from (by default the "
                "closing threshold) to the highest score. The same range decides elevated, crossing into "
                "or out of the elevated range, and stagnation.",
            ),
            (
                "trigger-only",
                "Kun utløserledd",
                "Trigger only",
                "The scale was closed at this administration and its trigger stayed at or below the "
                "opening threshold: only the trigger was asked, and the score is the trigger alone. "
                "Without it the scale was asked in full.",
            ),
            (
                "closed",
                "Lukket",
                "Closed",
                "After this administration the closing rule leaves the scale closed (it never opened, "
                "or the moving average of its last full scores, component mean-last3, is below the "
                "closing threshold): at the next administration only its trigger is asked, and it "
                "re-opens the scale there when above the opening threshold. A clinician's override may "
                "still ask it in full.",
            ),
            (
                "reliable-improvement",
                "Reliabel bedring",
                "Reliable improvement",
                "|RC| > 1.96 toward fewer problems.",
            ),
            (
                "reliable-deterioration",
                "Reliabel forverring",
                "Reliable deterioration",
                "|RC| > 1.96 toward more problems.",
            ),
            ("no-reliable-change", "Ingen reliabel endring", "No reliable change", "|RC| <= 1.96."),
            (
                "stagnation",
                "Stagnasjon",
                "Stagnation",
                "In the elevated range at every administration of the stagnation window with no "
                "reliable change.",
            ),
            (
                "expected-range",
                "Forventet område",
                "Expected-recovery range",
                "The type of the referenceRange that gives the expected-recovery band at this "
                "administration for the episode's intake score (the mapping's expected_recovery, fitted "
                "on the clinic's own finished episodes).",
            ),
            (
                "not-on-track",
                "Ikke i rute",
                "Not on track",
                "The score is outside the expected-recovery band on its worse side at this administration "
                "and at the previous one: a worse course than expected for the starting point. A signal "
                "for the clinician's attention, not a diagnosis.",
            ),
        ],
    ),
    "rom-components": (
        "RomComponents",
        "Routine outcome monitoring score components",
        [
            (
                "scale-score",
                "Skalaskår",
                "Scale score",
                "Mean of the answered items, 1-7, higher = more problems.",
            ),
            (
                "trigger-score",
                "Utløserskår",
                "Trigger score",
                "The trigger item scored in the problem direction.",
            ),
            ("z-score", "z-skår", "z-score", "(score - norm mean) / norm SD."),
            ("t-score", "T-skår", "T-score", "50 + 10 z."),
            ("items-answered", "Besvarte ledd", "Items answered", "Number of items with a numeric score."),
            (
                "rc-first",
                "RC fra første",
                "RC from first",
                "Reliable change index from the first administration.",
            ),
            (
                "rc-previous",
                "RC fra forrige",
                "RC from previous",
                "Reliable change index from the previous one.",
            ),
            (
                "rti",
                "RTI",
                "Reliable trend index",
                "Reliable Trend Index over all administrations (McAleavey).",
            ),
            (
                "mean-last3",
                "Glidende snitt",
                "Moving average",
                "Mean of the last scale scores (closing rule).",
            ),
            (
                "percent-of-max",
                "Prosent av maks",
                "Percent of maximum",
                "Raw score as percent of the maximum.",
            ),
        ],
    ),
    "rom-alerts": (
        "RomAlerts",
        "Routine outcome monitoring alerts",
        [
            ("suicide-risk", "Selvmordsrisiko", "Suicide risk", "Elevated suicidality trigger or scale."),
            ("deterioration", "Forverring", "Deterioration", "Reliable deterioration on a scale."),
            (
                "alliance-rupture",
                "Brudd i samarbeidet",
                "Alliance rupture",
                "Alliance low or reliably dropped.",
            ),
            (
                "prefer-not-suicide",
                "Ville ikke svare om selvmord",
                "Declined suicidality item",
                "The patient chose 'prefer not to answer' on a suicidality item.",
            ),
            (
                "not-on-track",
                "Ikke i rute",
                "Not on track",
                "A scale (or the alliance total) outside its expected-recovery band on the worse side at "
                "two administrations in a row; resolves when the score is back inside the band.",
            ),
        ],
    ),
}

# Used only by the one-off ``mapping`` subcommand; afterwards the committed mapping is the source.
_SCALE_NAMES_NB = {
    "sad": "Tristhet",
    "somAnx": "Somatisk angst",
    "eating": "Spiseproblemer",
    "suicide": "Selvmordstanker",
    "subUse": "Rusbruk",
    "trauma": "Traumereaksjon",
    "irritable": "Irritabilitet",
    "hopeless": "Håpløshet",
    "worry": "Bekymring",
    "avoidSit": "Unngåelse av situasjoner",
    "avoidSoc": "Sosial unngåelse",
    "internal": "Indre unngåelse",
    "selfCrit": "Selvkritikk",
    "control": "Kontrollbehov",
    "socialSafety": "Sosial trygghet",
    "ready": "Beredskap for bedring",
    "recovEnv": "Bedringsmiljø",
    "genFunc": "Generell fungering",
    "cog": "Kognitive vansker",
    "subRecov": "Bedring fra rusbruk",
}
_DOMAINS = [
    ("symptom-expression", "Symptomuttrykk", "Symptom expression"),
    ("problem-maintaining", "Problemopprettholdende prosesser", "Problem-maintaining processes"),
    ("resources", "Ressurser", "Resources"),
    ("personal-consequences", "Personlige konsekvenser", "Personal consequences"),
]
_SECTIONS = [
    ("triggers", "Innledende spørsmål", "Opening questions"),
    ("scales", "Utdypende spørsmål", "Follow-up questions"),
    ("alliance", "Samarbeidet med behandleren", "Working with your therapist"),
    (
        "preferences",
        "Hva ønsker du mer eller mindre av i behandlingen?",
        "What would you like more or less of?",
    ),
    ("single", "Andre spørsmål", "Other questions"),
    ("medication", "Medisiner", "Medication"),
]
_ALLIANCE_NAMES = {"goal": ("Mål", "Goal"), "bond": ("Relasjon", "Bond"), "task": ("Oppgaver", "Task")}
_NORM_SOURCE = (
    "Norm table 2019 of the NorseResearch R package (andrewmcaleavey/NorseResearch, MIT licence); "
    "McAleavey, Nordberg & Moltu (2021)"
)
_RELIABILITY_SOURCE = (
    "No per-scale reliability is published for Norse Feedback; assumed value to be replaced by a local "
    "Cronbach's alpha (fhir-norse calibrate)"
)


# --- the mapping (one-off) ------------------------------------------------------------------------


def _number(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def _suffix(link_id: str) -> str:
    return link_id.split("-", 1)[1] if "-" in link_id else link_id


def generate_mapping(csv_path: Path, source: ItemSource, version: str = "2.1.0") -> dict[str, Any]:
    """The mapping as plain data: numbers from ``nf21-scales.csv``, linkIds from the item source."""
    base = BASE
    with csv_path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    source_scales = {s.scale: s for s in source.scales}
    scales: list[dict[str, Any]] = []
    for row in rows:
        code = row["scale"]
        link_ids = [i.id for i in source_scales[code].items]
        if len(link_ids) != int(row["n_items"]):
            raise ValueError(f"{code}: the item source has {len(link_ids)} items, the CSV {row['n_items']}")
        own_trigger = row["trigger_is_item_of_scale"].strip() == "yes"
        reverse = [link_ids[int(p) - 1] for p in row["item_positions_reverse_keyed"].split()]
        scale: dict[str, Any] = {
            "code": code,
            "name": {"nb": _SCALE_NAMES_NB[code], "en": row["name_en"]},
            "domain": row["domain"],
            "items": link_ids,
        }
        if own_trigger:
            scale["trigger"] = link_ids[0]
        else:
            scale["opens_on"] = "subUse" if "subUse" in row["trigger_is_item_of_scale"] else None
        scale |= {
            "reverse_keyed": reverse,
            "open_if_trigger_gt": _number(row["open_if_trigger_gt"]),
            "close_if_mean_last3_lt": _number(row["close_if_mean_last3_lt"]),
            "close_window": 3,
            "norms": {
                "mean": _number(row["norm_mean"]),
                "sd": _number(row["norm_sd"]),
                "n": int(row["norm_n"]),
                "population": "Helse Førde 2019, outpatient first assessments",
                "source": _NORM_SOURCE,
            },
            "reliability": {"value": 0.80, "source": _RELIABILITY_SOURCE, "assumed": True},
        }
        scales.append(scale)
    dims: dict[str, list[str]] = {}
    for item in source.alliance:
        dims.setdefault(item.dimension or "", []).append(item.id)
    return {
        "instrument": "nf21",
        "version": version,
        "title": {"nb": "Norse Feedback 2.1 (struktur)", "en": "Norse Feedback 2.1 (structure)"},
        "canonical_base": base,
        "questionnaires": {
            "adaptive": f"{base}/Questionnaire/nf21-adaptive",
            "static": f"{base}/Questionnaire/nf21-static",
        },
        "answer_handling": {
            "min": 1,
            "max": 7,
            "not_relevant": {
                "code": "not-relevant",
                "clinical_scales": 1,
                "alliance": "missing",
                "preferences": "missing",
                "single_items": "missing",
            },
            "prefer_not": {
                "code": "prefer-not",
                "clinical_scales": "missing",
                "alliance": "missing",
                "preferences": "missing",
                "single_items": "missing",
            },
        },
        "close_min_administrations": 3,
        "domains": [{"code": c, "name": {"nb": nb, "en": en}} for c, nb, en in _DOMAINS],
        "scales": scales,
        "display_order": [s["code"] for s in scales],
        "sections": [{"id": i, "title": {"nb": nb, "en": en}} for i, nb, en in _SECTIONS],
        "alliance": {
            "dimensions": [
                {"code": d, "name": {"nb": _ALLIANCE_NAMES[d][0], "en": _ALLIANCE_NAMES[d][1]}, "items": ids}
                for d, ids in dims.items()
            ],
            "total": "total",
            "item_max": 7,
            "max_raw": 7 * len(source.alliance),
        },
        "preferences": [{"link_id": p.id, "construct": _suffix(p.id)} for p in source.preferences],
        "single": [
            {"link_id": s.id, "direction": s.direction, "construct": _suffix(s.id)} for s in source.single
        ],
        "medication": [
            {"link_id": m.id, "direction": m.direction, "construct": _suffix(m.id)} for m in source.medication
        ],
    }


_MAPPING_HEADER = """\
# Norse Feedback 2.1 structure: scoring and adaptive rules, norms and reliabilities (content is data).
# Generated once by `python tools/build_content.py mapping --csv nf21-scales.csv` from
# ../shared/domain/nf21-scales.csv (numbers unchanged) and questionnaires/source/nf21-items.yaml
# (linkIds); edit this file by hand from now on, and bump `version` when anything changes.
#
# answer_handling: agreement 1-7; reverse-keyed items score min + max - x (8 - x). "not-relevant" scores
#   1 (no problem) on clinical scales and is missing on alliance and preferences; "prefer-not" is
#   always missing.
# Adaptive rule per scale: the scale opens when its trigger, scored in the problem direction, is
#   strictly above open_if_trigger_gt; an open scale closes when the mean of its last close_window
#   scale scores is below close_if_mean_last3_lt; a closed scale re-opens when the trigger is above the
#   opening threshold again. subRecov has no trigger of its own: it opens on the subUse trigger.
# close_min_administrations: a scale may close only once it has at least this many scale scores; with
#   fewer it stays open (the sources leave this open; 3 = the moving-average window).
# reliability: none is published per scale; 0.80 is an assumption (assumed: true) to be replaced by a
#   local Cronbach's alpha.
"""


class _MappingDumper(yaml.SafeDumper):  # type: ignore[misc]
    """Block style, except lists of scalars and small bilingual labels on one line."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(v, dict | list) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_dict(dumper: yaml.SafeDumper, data: dict[str, Any]) -> yaml.Node:
    flow = set(data) == {"nb", "en"}
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flow)


_MappingDumper.add_representer(list, _represent_list)
_MappingDumper.add_representer(dict, _represent_dict)


def write_mapping(root: Path, csv_path: Path) -> Path:
    data = generate_mapping(csv_path, load_item_source(root / ITEMS_SOURCE))
    InstrumentMapping.model_validate(data)
    text = yaml.dump(data, Dumper=_MappingDumper, sort_keys=False, allow_unicode=True, width=200)
    out = root / MAPPING
    out.write_text(_MAPPING_HEADER + text, encoding="utf-8")
    return out


# --- FHIR helpers ---------------------------------------------------------------------------------


def _translation(en: str) -> dict[str, Any]:
    return {
        "extension": [
            {
                "url": TRANSLATION,
                "extension": [{"url": "lang", "valueCode": "en"}, {"url": "content", "valueString": en}],
            }
        ]
    }


def _text(nb: str, en: str) -> dict[str, Any]:
    return {"text": nb, "_text": _translation(en)}


def write_json(path: Path, resource: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(resource, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def trigger_codes_above(threshold: float, reverse_keyed: bool, low: int = 1, high: int = 7) -> list[str]:
    """Raw answer codes whose problem-direction score is strictly above ``threshold``."""
    codes = []
    for raw in range(low, high + 1):
        score = low + high - raw if reverse_keyed else raw
        if score > threshold:
            codes.append(str(raw))
    return codes


class _Builder:
    def __init__(self, mapping: InstrumentMapping, source: ItemSource) -> None:
        self.m = mapping
        self.src = source
        self.items = source.items_by_id()
        self.base = mapping.canonical_base
        self.scale_of = {i: s for s in mapping.scales for i in s.items}
        self.reverse = {i for s in mapping.scales for i in s.reverse_keyed}
        # The code systems whose content is the instrument's (versioned with it; module doc).
        self.instrument_ids: set[str] = set()

    # terminology ---------------------------------------------------------------------------------

    def cs_url(self, cs_id: str) -> str:
        return f"{self.base}/CodeSystem/{cs_id}"

    def _code_system(
        self,
        cs_id: str,
        name: str,
        title: str,
        concepts: list[dict[str, Any]],
        *,
        instrument: bool,
        properties: list[dict[str, Any]] | None = None,
        description: str | None = None,
    ) -> dict[str, Any]:
        if instrument:
            self.instrument_ids.add(cs_id)
        cs: dict[str, Any] = {
            "resourceType": "CodeSystem",
            "id": cs_id,
            "language": "nb",
            "url": self.cs_url(cs_id),
            "version": self.m.version
            if instrument
            else PROJECT_CODE_SYSTEM_VERSIONS.get(cs_id, PROJECT_TERMINOLOGY_VERSION),
            "name": name,
            "title": title,
            "status": "active",
            "experimental": False,
            "publisher": "fhir-norse",
        }
        if description:
            cs["description"] = description
        cs |= {
            "caseSensitive": True,
            "valueSet": f"{self.base}/ValueSet/{cs_id}",
            "content": "complete",
            "count": len(concepts),
        }
        if properties:
            cs["property"] = properties
        cs["concept"] = concepts
        return cs

    def _value_set(self, cs: dict[str, Any]) -> dict[str, Any]:
        return {
            "resourceType": "ValueSet",
            "id": cs["id"],
            "url": f"{self.base}/ValueSet/{cs['id']}",
            "version": cs["version"],
            "name": cs["name"],
            "title": cs["title"],
            "status": "active",
            "experimental": False,
            "publisher": "fhir-norse",
            "description": f"All codes of {cs['url']}.",
            "compose": {"include": [{"system": cs["url"], "version": cs["version"]}]},
        }

    @staticmethod
    def _concept(code: str, nb: str, en: str, definition: str | None = None, **props: Any) -> dict[str, Any]:
        concept: dict[str, Any] = {"code": code, "display": nb}
        if definition:
            concept["definition"] = definition
        concept["designation"] = [{"language": "en", "value": en}]
        prop_list = []
        for key, value in props.items():
            if isinstance(value, bool):
                prop_list.append({"code": key, "valueBoolean": value})
            elif value is not None:
                prop_list.append({"code": key, "valueCode": value})
        if prop_list:
            concept["property"] = prop_list
        return concept

    def code_systems(self) -> list[dict[str, Any]]:
        m = self.m
        out = []
        item_concepts = []
        for link_id in m.all_link_ids():
            src = self.items[link_id]
            scale = self.scale_of.get(link_id)
            if scale is not None:
                item_concepts.append(
                    self._concept(
                        link_id,
                        src.nb,
                        src.en,
                        scale=scale.code,
                        trigger=scale.trigger == link_id,
                        reverseKeyed=link_id in self.reverse,
                    )
                )
            else:
                item_concepts.append(self._concept(link_id, src.nb, src.en))
        out.append(
            self._code_system(
                "nf21-items",
                "NF21Items",
                "Norse Feedback 2.1 items (fhir-norse wording)",
                item_concepts,
                instrument=True,
                properties=[
                    {
                        "code": "scale",
                        "uri": self.cs_url("nf21-scales"),
                        "type": "code",
                        "description": "The clinical scale the item belongs to",
                    },
                    {"code": "trigger", "type": "boolean", "description": "The item is its scale's trigger"},
                    {
                        "code": "reverseKeyed",
                        "type": "boolean",
                        "description": "Scored min + max - x (positively worded)",
                    },
                ],
            )
        )
        out.append(
            self._code_system(
                "nf21-scales",
                "NF21Scales",
                "Norse Feedback 2.1 scales",
                [self._concept(s.code, s.name.nb, s.name.en, domain=s.domain) for s in m.scales],
                instrument=True,
                properties=[
                    {
                        "code": "domain",
                        "uri": self.cs_url("nf21-domains"),
                        "type": "code",
                        "description": "The domain of the scale",
                    }
                ],
            )
        )
        out.append(
            self._code_system(
                "nf21-domains",
                "NF21Domains",
                "Norse Feedback 2.1 domains",
                [self._concept(d.code, d.name.nb, d.name.en) for d in m.domains],
                instrument=True,
            )
        )
        labels = self.src.answer_labels
        out.append(
            self._code_system(
                "nf21-answers",
                "NF21Answers",
                "Norse Feedback 2.1 answers",
                [self._concept(c, labels[c].nb, labels[c].en) for c in m.answer_handling.codes()],
                instrument=True,
            )
        )
        alliance = [self._concept(d.code, d.name.nb, d.name.en) for d in m.alliance.dimensions]
        alliance.append(self._concept(m.alliance.total, "Samlet", "Total"))
        out.append(
            self._code_system(
                "nf21-alliance", "NF21Alliance", "Norse Feedback 2.1 alliance", alliance, instrument=True
            )
        )
        for cs_id, (name, title, concepts) in PROJECT_CODE_SYSTEMS.items():
            if cs_id == "preference-values":
                built = [self._concept(c, v.nb, v.en) for c, v in self.src.preference_labels.items()]
            else:
                built = [self._concept(c, nb, en, d) for c, nb, en, d in concepts]
            out.append(self._code_system(cs_id, name, title, built, instrument=False))
        return out

    # questionnaires ------------------------------------------------------------------------------

    def _coding(self, cs_id: str, code: str, label_nb: str, label_en: str) -> dict[str, Any]:
        return {
            "system": self.cs_url(cs_id),
            "code": code,
            "display": label_nb,
            "_display": _translation(label_en),
        }

    def _agreement_options(self) -> list[dict[str, Any]]:
        labels = self.src.answer_labels
        options = []
        ah = self.m.answer_handling
        for value in range(ah.min, ah.max + 1):
            code = str(value)
            options.append(
                {
                    "extension": [{"url": ORDINAL_VALUE, "valueDecimal": value}],
                    "valueCoding": self._coding("nf21-answers", code, labels[code].nb, labels[code].en),
                }
            )
        for code in (ah.not_relevant.code, ah.prefer_not.code):
            options.append(
                {"valueCoding": self._coding("nf21-answers", code, labels[code].nb, labels[code].en)}
            )
        return options

    def _preference_options(self) -> list[dict[str, Any]]:
        out = [
            {"valueCoding": self._coding("preference-values", c, v.nb, v.en)}
            for c, v in self.src.preference_labels.items()
        ]
        labels = self.src.answer_labels
        for code in (self.m.answer_handling.not_relevant.code, self.m.answer_handling.prefer_not.code):
            out.append({"valueCoding": self._coding("nf21-answers", code, labels[code].nb, labels[code].en)})
        return out

    def _item_extension(self, link_id: str) -> list[dict[str, Any]]:
        scale = self.scale_of.get(link_id)
        subs: list[dict[str, Any]] = []
        if scale is not None:
            subs = [
                {"url": "scale", "valueCoding": {"system": self.cs_url("nf21-scales"), "code": scale.code}},
                {
                    "url": "domain",
                    "valueCoding": {"system": self.cs_url("nf21-domains"), "code": scale.domain},
                },
                {"url": "trigger", "valueBoolean": scale.trigger == link_id},
                {"url": "reverseKeyed", "valueBoolean": link_id in self.reverse},
            ]
        else:
            for d in self.m.alliance.dimensions:
                if link_id in d.items:
                    subs = [
                        {
                            "url": "allianceDimension",
                            "valueCoding": {"system": self.cs_url("nf21-alliance"), "code": d.code},
                        }
                    ]
        if not subs:
            return []
        return [{"url": f"{self.base}/StructureDefinition/nf21-item", "extension": subs}]

    def _question(self, link_id: str, options: list[dict[str, Any]]) -> dict[str, Any]:
        src: SourceItem = self.items[link_id]
        item: dict[str, Any] = {}
        ext = self._item_extension(link_id)
        if ext:
            item["extension"] = ext
        item["linkId"] = link_id
        item["code"] = [{"system": self.cs_url("nf21-items"), "code": link_id}]
        item |= _text(src.nb, src.en)
        item |= {"type": "choice", "required": False, "answerOption": options}
        return item

    def _section(self, section_id: str) -> tuple[str, str]:
        for s in self.m.sections:
            if s.id == section_id:
                return s.title.nb, s.title.en
        raise KeyError(section_id)

    def _group(self, link_id: str, nb: str, en: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"linkId": link_id, **_text(nb, en), "type": "group", "item": items}

    def _enable_when(self, scale: Scale) -> list[dict[str, Any]]:
        trigger = self.m.trigger_of(scale)
        codes = trigger_codes_above(
            scale.open_if_trigger_gt,
            trigger in self.reverse,
            self.m.answer_handling.min,
            self.m.answer_handling.max,
        )
        if not codes:
            raise ValueError(f"{scale.code}: no answer to its trigger is above {scale.open_if_trigger_gt}")
        return [
            {
                "question": trigger,
                "operator": "=",
                "answerCoding": {"system": self.cs_url("nf21-answers"), "code": c},
            }
            for c in codes
        ]

    def _header(self, q_id: str, name: str, url: str) -> dict[str, Any]:
        return {
            "resourceType": "Questionnaire",
            "id": q_id,
            "language": "nb",
            "url": url,
            "version": self.m.version,
            "name": name,
            "title": self.src.title.nb,
            "_title": _translation(self.src.title.en),
            "status": "active",
            "experimental": False,
            "subjectType": ["Patient"],
            "publisher": "fhir-norse",
        }

    def _tail_sections(self, agreement: list[dict[str, Any]]) -> list[dict[str, Any]]:
        m = self.m
        groups = {
            "alliance": [self._question(i, agreement) for i in m.alliance.items],
            "preferences": [self._question(p.link_id, self._preference_options()) for p in m.preferences],
            "single": [self._question(s.link_id, agreement) for s in m.single],
            "medication": [self._question(s.link_id, agreement) for s in m.medication],
        }
        out = []
        for section in m.sections:
            if section.id in groups:
                out.append(
                    self._group(f"group-{section.id}", section.title.nb, section.title.en, groups[section.id])
                )
        return out

    def static_questionnaire(self) -> dict[str, Any]:
        m = self.m
        q = self._header("nf21-static", "NF21Static", m.questionnaires.static)
        q["description"] = (
            "Static form of the Norse Feedback 2.1 structure for any SDC form filler: the trigger of every "
            "scale first; each scale's other items are enabled when its trigger, scored in the problem "
            "direction, is above the scale's opening threshold. Scoring rules, norms and closing rules are "
            "in "
            f"mappings/{m.instrument}-{m.version}.yaml."
        )
        agreement = self._agreement_options()
        scales = {s.code: s for s in m.scales}
        ordered = [scales[c] for c in m.display_order]
        triggers = [self._question(s.trigger, agreement) for s in ordered if s.trigger is not None]
        items: list[dict[str, Any]] = []
        for section in m.sections:
            if section.id == "triggers":
                nb, en = section.title.nb, section.title.en
                items.append(self._group("group-triggers", nb, en, triggers))
            elif section.id == "scales":
                for s in ordered:
                    rest = [self._question(i, agreement) for i in s.items if i != s.trigger]
                    if not rest:
                        continue
                    group = self._group(f"group-{s.code}", s.name.nb, s.name.en, rest)
                    group["enableWhen"] = self._enable_when(s)
                    group["enableBehavior"] = "any"
                    items.append(group)
        tail = {g["linkId"]: g for g in self._tail_sections(agreement)}
        for section in m.sections:
            if f"group-{section.id}" in tail:
                items.append(tail[f"group-{section.id}"])
        q["item"] = items
        return q

    def adaptive_questionnaire(self) -> dict[str, Any]:
        m = self.m
        q = self._header("nf21-adaptive", "NF21Adaptive", m.questionnaires.adaptive)
        q = {
            "resourceType": "Questionnaire",
            "id": "nf21-adaptive",
            "meta": {"profile": [SDC_ADAPT_PROFILE]},
            "language": "nb",
            "extension": [{"url": SDC_ADAPTIVE, "valueBoolean": True}],
            **{k: v for k, v in q.items() if k not in ("resourceType", "id", "language")},
        }
        q["description"] = (
            "Adaptive form of the Norse Feedback 2.1 structure (SDC $next-question): every item definition, "
            "listed flat; the server selects the triggers and the items of open scales per administration "
            f"following mappings/{m.instrument}-{m.version}.yaml."
        )
        agreement = self._agreement_options()
        scales = {s.code: s for s in m.scales}
        ordered = [scales[c] for c in m.display_order]
        flat = [self._question(s.trigger, agreement) for s in ordered if s.trigger is not None]
        flat += [self._question(i, agreement) for s in ordered for i in s.items if i != s.trigger]
        for group in self._tail_sections(agreement):
            flat += group["item"]
        q["item"] = flat
        return q


def in_language(value: Any, language: str) -> Any:
    """``value`` with every translated ``text``, ``display`` and ``title`` replaced by its translation
    into ``language`` (the translation extension dropped): a form in another language."""
    if isinstance(value, list):
        return [in_language(v, language) for v in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key.startswith("_") and key[1:] in ("text", "display", "title"):
            continue
        translated = (
            _translated(value.get(f"_{key}"), language) if key in ("text", "display", "title") else None
        )
        out[key] = translated if translated is not None else in_language(item, language)
    return out


def _translated(element: Any, language: str) -> str | None:
    for ext in (element or {}).get("extension", []) if isinstance(element, dict) else ():
        if ext.get("url") != TRANSLATION:
            continue
        subs = {e.get("url"): e for e in ext.get("extension", [])}
        if subs.get("lang", {}).get("valueCode") == language:
            content = subs.get("content", {}).get("valueString")
            return content if isinstance(content, str) else None
    return None


def english_form(form: dict[str, Any]) -> dict[str, Any]:
    """The English Questionnaire of bokmål ``form`` (module doc): its own id, canonical and name, the
    items and codes of ``form``."""
    english = in_language(form, "en")
    q_id, url = f"{form['id']}-en", f"{form['url']}-en"
    out: dict[str, Any] = {}
    for key, value in english.items():
        if key == "id":
            value = q_id
        elif key == "language":
            value = "en"
        elif key == "url":
            value = url
        elif key == "name":
            value = f"{value}En"
        elif key == "description":
            value = (
                f"English wording of {form['url']}|{form['version']}: the same items, codes and answer "
                "options, scored by the same mapping. " + str(value)
            )
        out[key] = value
        if key == "title":
            out["derivedFrom"] = [f"{form['url']}|{form['version']}"]
    return out


def _authors_forms(mapping: InstrumentMapping) -> bool:
    """Whether ``mapping`` scores Questionnaires of its own version (a calibrated mapping pins the forms
    of the version it recalibrates and authors no content)."""
    canonicals = (mapping.questionnaires.static, mapping.questionnaires.adaptive)
    return all(c.partition("|")[2] in ("", mapping.version) for c in canonicals)


def load_mappings(root: Path) -> list[InstrumentMapping]:
    """The Norse Feedback mappings under ``root/mappings`` that author forms, oldest version first."""
    found = [load_mapping(p) for p in sorted((root / MAPPINGS_DIR).glob(MAPPINGS_GLOB))]
    return sorted((m for m in found if _authors_forms(m)), key=lambda m: version_key(m.version))


def questionnaire_file(q: dict[str, Any]) -> str:
    """The file name of Questionnaire ``q`` under ``questionnaires/nf21`` (module doc)."""
    if q["version"] == UNVERSIONED_FILE_VERSION:
        return f"Questionnaire-{q['id']}.json"
    return f"Questionnaire-{q['id']}-{q['version']}.json"


def _retired(concept: dict[str, Any]) -> dict[str, Any]:
    props = [*concept.get("property", []), {"code": "status", "valueCode": "retired"}]
    return {**concept, "property": props}


def _merged_code_systems(mappings: list[InstrumentMapping], source: ItemSource) -> list[dict[str, Any]]:
    """The code systems of the newest of ``mappings``, each instrument code system completed with the
    codes only older versions use, retired (module doc); versioned with the newest mapping."""
    builders = [_Builder(m, source) for m in mappings]
    newest = builders[-1]
    out = []
    for cs in newest.code_systems():
        if cs["id"] not in newest.instrument_ids:
            out.append(cs)
            continue
        codes = {c["code"] for c in cs["concept"]}
        retired = []
        for older in reversed(builders[:-1]):
            for other in older.code_systems():
                if other["id"] != cs["id"]:
                    continue
                for concept in other["concept"]:
                    if concept["code"] not in codes:
                        codes.add(concept["code"])
                        retired.append(_retired(concept))
        if retired:
            status = {
                "code": "status",
                "uri": CONCEPT_STATUS,
                "type": "code",
                "description": "retired: asked by an earlier version of the instrument only",
            }
            concepts = [*cs["concept"], *retired]
            cs = {k: v for k, v in cs.items() if k not in ("property", "concept")} | {
                "count": len(concepts),
                "property": [*cs.get("property", []), status],
                "concept": concepts,
            }
        out.append(cs)
    return out


def terminology(mappings: list[InstrumentMapping], source: ItemSource) -> list[dict[str, Any]]:
    """Every code system of ``mappings`` (oldest first): the newest version's codes and the retired ones;
    an instrument code system carries the first mapping version at which it took this content."""
    newest = _Builder(mappings[-1], source)
    newest.code_systems()
    prefixes = [
        {c["id"]: c for c in _merged_code_systems(mappings[: n + 1], source)} for n in range(len(mappings))
    ]
    out = []
    for cs in prefixes[-1].values():
        if cs["id"] in newest.instrument_ids:
            for mapping, earlier in zip(mappings, prefixes, strict=True):
                same = earlier.get(cs["id"])
                if same is not None and {**same, "version": None} == {**cs, "version": None}:
                    cs = {**cs, "version": mapping.version}
                    break
        out.append(cs)
    return out


def build(
    root: Path,
    *,
    items_path: Path | None = None,
    mapping_path: Path | None = None,
    out_root: Path | None = None,
) -> list[Path]:
    """Write the terminology and the Questionnaires (bokmål and English) of every mapping version (of
    ``mapping_path`` alone when given); return the written paths (sorted)."""
    source = load_item_source(items_path or root / ITEMS_SOURCE)
    mappings = [load_mapping(mapping_path)] if mapping_path else load_mappings(root)
    if not mappings:
        raise ValueError(f"no {MAPPINGS_GLOB} under {root / MAPPINGS_DIR}")
    for mapping in mappings:
        missing = [i for i in mapping.all_link_ids() if i not in source.items_by_id()]
        if missing:
            raise ValueError(f"{mapping.version}: the item source has no wording for {missing}")
    out = out_root or root
    newest = _Builder(mappings[-1], source)
    written = []
    for cs in terminology(mappings, source):
        for resource in (cs, newest._value_set(cs)):
            path = out / TERMINOLOGY_DIR / f"{resource['resourceType']}-{resource['id']}.json"
            write_json(path, resource)
            written.append(path)
    for mapping in mappings:
        b = _Builder(mapping, source)
        bokmal = [b.static_questionnaire(), b.adaptive_questionnaire()]
        for q in [*bokmal, *(english_form(f) for f in bokmal)]:
            path = out / NF21_DIR / questionnaire_file(q)
            write_json(path, q)
            written.append(path)
    return sorted(written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the Norse Feedback FHIR content from its sources")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="repository root (default: .)")
    sub = parser.add_subparsers(dest="command")
    mapping = sub.add_parser("mapping", help="(once) write the mapping file from nf21-scales.csv")
    mapping.add_argument("--csv", type=Path, required=True, help="path to nf21-scales.csv")
    args = parser.parse_args(argv)
    if args.command == "mapping":
        print(write_mapping(args.root, args.csv))
        return 0
    for path in build(args.root):
        print(path.relative_to(args.root))
    return 0
