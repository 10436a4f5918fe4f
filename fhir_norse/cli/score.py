"""``fhir-norse score FILE.json``: score one QuestionnaireResponse offline, for testers.

Prints what ``QuestionnaireResponse/$extract`` answers (the transaction Bundle scoring would write;
with warnings, a Parameters resource with ``return`` and ``issues``), using the Questionnaires and
mappings of a content pack and no database: there is no history, so no change statistics, and no
stored alerts to keep or resolve. A response that intake would refuse prints its OperationOutcome
and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from fhir_norse.instruments.intake import validate_response
from fhir_norse.instruments.registry import InstrumentRegistry, version_key
from fhir_norse.instruments.schema import ContentError, InstrumentMapping
from fhir_norse.outcomes import FhirError, Issue, operation_outcome
from fhir_norse.server.content import content_files
from fhir_norse.server.resources import instant, now_ms
from fhir_norse.server.validation import validate_resource

COMMANDS = frozenset({"score"})


def register_commands(sub: Any) -> None:
    score = sub.add_parser(
        "score",
        help="score a QuestionnaireResponse file offline and print the Bundle scoring would write",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument("file", help="a QuestionnaireResponse as JSON ('-' reads standard input)")
    score.add_argument("--content-dir", help="the content pack (default: this checkout)")


def _questionnaire(root: Path, canonical: str) -> dict[str, Any] | None:
    url, _, version = canonical.partition("|")
    found: list[dict[str, Any]] = []
    for path in content_files(root):
        resource = orjson.loads(path.read_bytes())
        if (
            isinstance(resource, dict)
            and resource.get("resourceType") == "Questionnaire"
            and resource.get("url") == url
            and (not version or resource.get("version") == version)
        ):
            found.append(resource)
    return max(found, key=lambda q: version_key(str(q.get("version") or "0")), default=None)


def score_file(text: bytes, root: Path) -> tuple[int, dict[str, Any]]:
    """(exit code, the JSON printed) for one response; see the module doc."""
    from fhir_norse.rom.intake import assemble_plan

    try:
        response = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        return 1, operation_outcome([Issue(f"Not JSON: {error}", code="structure")])
    try:
        validate_resource(response, expected_type="QuestionnaireResponse")
    except FhirError as error:
        return 1, error.outcome()
    canonical = response.get("questionnaire")
    form: dict[str, Any] | None = None
    if isinstance(canonical, str) and canonical.startswith("#"):
        # A response to a form it contains ($next-question, $populate): scored by the form's source.
        form = next(
            (c for c in response.get("contained") or [] if f"#{c.get('id')}" == canonical),
            None,
        )
        derived = (form or {}).get("derivedFrom") or []
        canonical = derived[0] if derived and isinstance(derived[0], str) else canonical
    questionnaire = _questionnaire(root, canonical) if isinstance(canonical, str) else None
    if questionnaire is None:
        issue = Issue(
            f"Questionnaire {canonical} is not in the content pack",
            code="not-found",
            expression=("QuestionnaireResponse.questionnaire",),
        )
        return 1, operation_outcome([issue])
    registry = InstrumentRegistry.from_content_dir(root)
    instrument = registry.for_questionnaire(str(questionnaire["url"]), questionnaire.get("version"))
    if instrument is None:
        issue = Issue(f"No mapping scores {canonical}", code="not-supported")
        return 1, operation_outcome([issue])
    mapping = instrument.mapping if isinstance(instrument.mapping, InstrumentMapping) else None
    issues = validate_response(response, form or questionnaire, mapping=mapping)
    if not response.get("subject"):
        issues.append(
            Issue("subject is required", code="required", expression=("QuestionnaireResponse.subject",))
        )
    if issues:
        return 1, operation_outcome(issues)
    if response.get("status") not in ("completed", "amended"):
        issue = Issue("Only completed or amended responses are scored", code="business-rule")
        return 1, operation_outcome([issue])
    administered = response.get("authored")
    if not (isinstance(administered, str) and administered):
        # As the server does with a response without authored: dated when it is received (here: now).
        administered = instant(now_ms())
        undated = Issue(
            f"authored is absent: the scores are dated {administered}, when the answers were scored",
            code="informational",
            severity="warning",
            expression=("QuestionnaireResponse.authored",),
        )
    else:
        undated = None
    plan = assemble_plan(response, questionnaire, instrument, administered=administered)
    bundle = plan.transaction()
    warnings = [*plan.warnings, *([undated] if undated else [])]
    if not warnings:
        return 0, bundle
    issues_json = operation_outcome(warnings)
    return 0, {
        "resourceType": "Parameters",
        "parameter": [{"name": "return", "resource": bundle}, {"name": "issues", "resource": issues_json}],
    }


def run_command(args: argparse.Namespace) -> int:
    from fhir_norse.config import PROJECT_ROOT

    root = Path(args.content_dir) if args.content_dir else PROJECT_ROOT
    try:
        text = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as error:
        print(f"fhir-norse score: cannot read {args.file}: {error.strerror}", file=sys.stderr)
        return 2
    try:
        code, out = score_file(text, root)
    except ContentError as error:
        print(f"fhir-norse score: content pack refused: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
    return code
