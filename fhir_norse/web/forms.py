"""The patient form's view of a Questionnaire and its working QuestionnaireResponse (pure: JSON in, JSON out).

A form is shown one *screen* at a time. The screens come from the Questionnaire the response answers:

* an adaptive response (SDC ``$next-question``,
  https://hl7.org/fhir/uv/sdc/STU3/adaptive.html): the pages (group items) of its contained
  Questionnaire, each cut into screens of at most :data:`SCREEN_SIZE` questions; a new page arrives with
  each call of the operation, so the screens only grow at the end;
* a static form (PHQ-9, GAD-7, the static NF form): its groups, in order, those enabled by the answers so
  far (R4 ``enableWhen``, https://hl7.org/fhir/R4/questionnaire-definitions.html#Questionnaire.item.enableWhen),
  each cut the same way; loose top-level questions are grouped together.

Texts are taken in the language asked for: the item's own ``text`` when the form is in that language,
else its translation (https://hl7.org/fhir/R4/languages.html#translation), else the original text marked
with the form's language. The answers stay in one response whatever the language shown.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

JsonDict = dict[str, Any]

SCREEN_SIZE = 5
TRANSLATION = "http://hl7.org/fhir/StructureDefinition/translation"
ORDINAL = "http://hl7.org/fhir/StructureDefinition/ordinalValue"
SDC_ADAPTIVE = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-questionnaireAdaptive"
LANGUAGES = ("nb", "en")


@dataclass(frozen=True, slots=True)
class Text:
    """A text to show and the language it is written in (for the page's ``lang`` attributes)."""

    value: str
    lang: str


@dataclass(frozen=True, slots=True)
class Option:
    code: str
    system: str
    label: Text
    # The 1-7 position of a scale answer (ordinalValue), None for the other options.
    ordinal: int | None


@dataclass(frozen=True, slots=True)
class Question:
    link_id: str
    text: Text
    prefix: str | None
    required: bool
    options: tuple[Option, ...]
    answer: str | None  # the code answered so far

    def option(self, code: str) -> Option | None:
        return next((o for o in self.options if o.code == code), None)


@dataclass(frozen=True, slots=True)
class Screen:
    number: int  # 1-based
    title: Text | None
    intro: tuple[Text, ...]
    questions: tuple[Question, ...]

    @property
    def unanswered(self) -> bool:
        return any(q.answer is None for q in self.questions)


@dataclass(slots=True)
class FormView:
    """The screens of a working response, in order."""

    title: Text | None
    adaptive: bool
    screens: list[Screen] = field(default_factory=list)

    def screen(self, number: int) -> Screen | None:
        return self.screens[number - 1] if 1 <= number <= len(self.screens) else None

    def first_unanswered(self) -> Screen | None:
        return next((s for s in self.screens if s.unanswered), None)


# ---------------------------------------------------------------------- texts


def form_language(questionnaire: Mapping[str, Any]) -> str:
    return str(questionnaire.get("language") or "en").split("-")[0]


def translated(element: Mapping[str, Any], key: str, language: str, source_language: str) -> Text | None:
    """``element[key]`` in ``language`` if the element has it (the text itself or its translation)."""
    value = element.get(key)
    if not isinstance(value, str):
        return None
    if source_language == language:
        return Text(value, language)
    for ext in (element.get(f"_{key}") or {}).get("extension") or []:
        if ext.get("url") != TRANSLATION:
            continue
        parts = {p.get("url"): p for p in ext.get("extension") or []}
        lang = (parts.get("lang") or {}).get("valueCode")
        content = (parts.get("content") or {}).get("valueString")
        if isinstance(lang, str) and lang.split("-")[0] == language and isinstance(content, str):
            return Text(content, language)
    return Text(value, source_language)


def _options(item: Mapping[str, Any], language: str, source: str) -> tuple[Option, ...]:
    out = []
    for option in item.get("answerOption") or []:
        coding = option.get("valueCoding")
        if not isinstance(coding, dict) or not coding.get("code"):
            continue
        label = translated(coding, "display", language, source) or Text(str(coding["code"]), source)
        ordinal = None
        for ext in option.get("extension") or []:
            if ext.get("url") == ORDINAL and isinstance(ext.get("valueDecimal"), int | float):
                ordinal = int(ext["valueDecimal"])
        out.append(Option(str(coding["code"]), str(coding.get("system") or ""), label, ordinal))
    return tuple(out)


# ---------------------------------------------------------------------- answers


def answers_of(response: Mapping[str, Any]) -> dict[str, JsonDict]:
    """The Coding answered for each linkId, wherever it sits in the response's item tree."""
    out: dict[str, JsonDict] = {}

    def walk(items: Iterable[Any]) -> None:
        for item in items:
            if not isinstance(item, dict):
                continue
            for answer in item.get("answer") or []:
                if isinstance(answer, dict) and isinstance(answer.get("valueCoding"), dict):
                    out[str(item.get("linkId"))] = answer["valueCoding"]
                    break
            walk(item.get("item") or [])

    walk(response.get("item") or [])
    return out


def is_adaptive(response: Mapping[str, Any]) -> bool:
    return isinstance(response.get("questionnaire"), str) and str(response["questionnaire"]).startswith("#")


def contained_form(response: Mapping[str, Any]) -> JsonDict | None:
    """The contained Questionnaire an adaptive response answers."""
    reference = response.get("questionnaire")
    for resource in response.get("contained") or []:
        if resource.get("resourceType") == "Questionnaire" and f"#{resource.get('id')}" == reference:
            return dict(resource)
    return None


def _enabled(item: Mapping[str, Any], answers: Mapping[str, JsonDict]) -> bool:
    """R4 enableWhen over coded answers (``=``, ``!=``, ``exists``; ``enableBehavior`` any or all)."""
    conditions = item.get("enableWhen") or []
    if not conditions:
        return True
    results = []
    for cond in conditions:
        given = answers.get(str(cond.get("question")))
        operator = cond.get("operator")
        if operator == "exists":
            results.append((given is not None) == bool(cond.get("answerBoolean")))
            continue
        expected = cond.get("answerCoding")
        same = (
            given is not None
            and isinstance(expected, dict)
            and given.get("code") == expected.get("code")
            and (not expected.get("system") or given.get("system") == expected.get("system"))
        )
        results.append(
            same if operator == "=" else (given is not None and not same) if operator == "!=" else False
        )
    return all(results) if item.get("enableBehavior") == "all" else any(results)


def _askable(item: Mapping[str, Any]) -> bool:
    return item.get("type") == "choice" and not item.get("readOnly") and bool(item.get("answerOption"))


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def build_view(
    questionnaire: Mapping[str, Any],
    response: Mapping[str, Any],
    language: str,
    *,
    size: int = SCREEN_SIZE,
) -> FormView:
    """The screens of ``response`` to ``questionnaire`` (the canonical of a static form; for an adaptive
    response, the canonical it derives from, used only for its title), in ``language``."""
    answers = answers_of(response)
    adaptive = is_adaptive(response)
    definition = contained_form(response) if adaptive else dict(questionnaire)
    definition = definition or {}
    source = form_language(definition or questionnaire)
    view = FormView(
        title=translated(questionnaire, "title", language, form_language(questionnaire)), adaptive=adaptive
    )

    def question(item: Mapping[str, Any]) -> Question:
        link_id = str(item.get("linkId"))
        return Question(
            link_id=link_id,
            text=translated(item, "text", language, source) or Text(link_id, source),
            prefix=item.get("prefix") if isinstance(item.get("prefix"), str) else None,
            required=bool(item.get("required")),
            options=_options(item, language, source),
            answer=str(answers[link_id]["code"]) if link_id in answers else None,
        )

    def add(title: Text | None, intro: list[Text], items: Sequence[Mapping[str, Any]]) -> None:
        for n, chunk in enumerate(_chunks(items, size)):
            view.screens.append(
                Screen(
                    number=len(view.screens) + 1,
                    title=title,
                    intro=tuple(intro) if n == 0 else (),
                    questions=tuple(question(i) for i in chunk),
                )
            )

    loose: list[Mapping[str, Any]] = []
    intro: list[Text] = []
    for item in definition.get("item") or []:
        if item.get("type") == "group":
            if loose:
                add(None, intro, loose)
                loose, intro = [], []
            if not _enabled(item, answers):
                continue
            children = [c for c in item.get("item") or [] if _askable(c) and _enabled(c, answers)]
            notes = [
                t
                for c in item.get("item") or []
                if c.get("type") == "display" and (t := translated(c, "text", language, source))
            ]
            if children:
                add(translated(item, "text", language, source), notes, children)
        elif item.get("type") == "display":
            text = translated(item, "text", language, source)
            if text is not None:
                intro.append(text)
        elif _askable(item) and _enabled(item, answers):
            loose.append(item)
    if loose:
        add(None, intro, loose)
    return view


# ---------------------------------------------------------------------- writing answers


def _definitions(definition: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for item in definition.get("item") or []:
        yield item
        yield from _definitions(item)


def option_coding(questionnaire_item: Mapping[str, Any], code: str) -> JsonDict | None:
    """The answer Coding of option ``code`` as the form defines it (system, code, display), or None."""
    for option in questionnaire_item.get("answerOption") or []:
        coding = option.get("valueCoding")
        if isinstance(coding, dict) and coding.get("code") == code:
            return {k: coding[k] for k in ("system", "code", "display") if k in coding}
    return None


def definition_of(questionnaire: Mapping[str, Any], response: Mapping[str, Any]) -> JsonDict:
    """The Questionnaire whose items the response answers (the contained one for an adaptive response)."""
    if is_adaptive(response):
        return contained_form(response) or {}
    return dict(questionnaire)


def with_answers(
    questionnaire: Mapping[str, Any], response: Mapping[str, Any], changes: Mapping[str, str | None]
) -> JsonDict:
    """A copy of ``response`` with ``changes`` (linkId -> option code, None: no answer) applied and its
    item tree rebuilt from the form: groups in form order, only answered questions, and nothing under a
    group or question that is not enabled by the answers."""
    definition = definition_of(questionnaire, response)
    items = {str(i.get("linkId")): i for i in _definitions(definition)}
    answers = answers_of(response)
    for link_id, code in changes.items():
        if code is None:
            answers.pop(link_id, None)
            continue
        coding = option_coding(items[link_id], code) if link_id in items else None
        if coding is None:
            raise ValueError(f"{code!r} is not an answer option of {link_id!r}")
        answers[link_id] = coding

    def tree(children: Iterable[Mapping[str, Any]]) -> list[JsonDict]:
        out: list[JsonDict] = []
        for item in children:
            if not _enabled(item, answers):
                continue
            link_id = str(item.get("linkId"))
            if item.get("type") == "group":
                inner = tree(item.get("item") or [])
                if inner:
                    out.append({"linkId": link_id, "item": inner})
            elif link_id in answers and _askable(item):
                out.append({"linkId": link_id, "answer": [{"valueCoding": dict(answers[link_id])}]})
        return out

    updated = copy.deepcopy(dict(response))
    rebuilt = tree(definition.get("item") or [])
    if rebuilt:
        updated["item"] = rebuilt
    else:
        updated.pop("item", None)
    return updated


def pages_delivered(response: Mapping[str, Any]) -> list[str]:
    """The page linkIds of an adaptive response's contained Questionnaire, in order."""
    form = contained_form(response) or {}
    return [str(page.get("linkId")) for page in form.get("item") or []]


def truncate_pages(response: Mapping[str, Any], keep: int) -> JsonDict:
    """An adaptive response with only its first ``keep`` pages (and their answers): what is left when an
    answer that decides the later pages has changed, so ``$next-question`` delivers them again."""
    out = copy.deepcopy(dict(response))
    form = contained_form(out)
    if form is None:
        return out
    kept = (form.get("item") or [])[:keep]
    names = {str(p.get("linkId")) for p in kept}
    for resource in out.get("contained") or []:
        if (
            resource.get("resourceType") == "Questionnaire"
            and f"#{resource.get('id')}" == out["questionnaire"]
        ):
            resource["item"] = copy.deepcopy(kept)
    items = [i for i in out.get("item") or [] if i.get("linkId") in names]
    if items:
        out["item"] = items
    else:
        out.pop("item", None)
    return out


def page_of(response: Mapping[str, Any], link_id: str) -> int | None:
    """The 0-based index of the adaptive page that asks ``link_id``."""
    form = contained_form(response) or {}
    for n, page in enumerate(form.get("item") or []):
        if any(i.get("linkId") == link_id for i in page.get("item") or []):
            return n
    return None
