"""``fhir-norse calibrate``: local reliabilities (Cronbach's alpha) written as a new mapping version.

The operator command around the pure :mod:`fhir_norse.scoring.calibrate` (this module reads the database
and writes a file; the computation stays pure):

1. the source mapping is the highest version of ``--instrument`` in ``<content dir>/mappings/`` (or
   ``--from-version``);
2. every current, not deleted QuestionnaireResponse with status ``completed`` or ``amended`` whose
   ``questionnaire`` is one of the Questionnaires that mapping scores (``url|version``, or the bare
   ``url``) is read from the ``resource`` table in keyset pages, prefiltered by the ``status`` and
   ``questionnaire`` search-index rows and checked again on the stored JSON;
3. alpha is estimated per scale (listwise complete administrations, at least ``--min-complete``), a
   table goes to stdout;
4. the new version (default: the source's patch version + 1) is written beside the source, with the
   usable estimates as ``assumed: false`` reliabilities and the Questionnaire canonicals pinned to the
   ``url|version`` the source scored, so the registry
   (:class:`~fhir_norse.instruments.registry.InstrumentRegistry`) picks the new mapping for the same,
   unchanged Questionnaire version. A file or a version that already exists is never overwritten.

Exit codes: 0 written (or, with ``--dry-run``, would be written), 1 nothing estimable or refused,
2 bad arguments, content or settings. Wire with ``register_commands(subparsers)`` and, for
``args.command in COMMANDS``, ``run_command(args, settings)``.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import yaml

from fhir_norse.instruments.registry import Instrument, InstrumentRegistry, version_key
from fhir_norse.instruments.schema import ContentError, InstrumentMapping
from fhir_norse.scoring.calibrate import (
    DEFAULT_MIN_COMPLETE,
    Estimate,
    calibrated_mapping,
    estimate_reliabilities,
    usable_alpha,
    write_mapping,
)
from fhir_norse.scoring.engine import answers_from_response

__all__ = [
    "COMMANDS",
    "COUNTED_STATUSES",
    "Calibration",
    "CalibrationRefused",
    "calibrate",
    "counts_response",
    "next_patch_version",
    "pinned_questionnaires",
    "register_commands",
    "render_table",
    "run_command",
]

COMMANDS = frozenset({"calibrate"})
COUNTED_STATUSES = ("completed", "amended")
PAGE_SIZE = 500
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
# The line width of the "Calibrated by" header comment, as the source headers are wrapped.
_HEADER_WIDTH = 105
# The safe loader, in C when PyYAML was built with libyaml (the mapping files are long).
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class CalibrationRefused(Exception):
    """The command cannot or will not write: ``exit_code`` 1 (refused, nothing estimable) or 2 (bad input)."""

    def __init__(self, message: str, exit_code: int, table: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        # The per-scale table, when the refusal came after estimating.
        self.table = table


@dataclass(frozen=True)
class Calibration:
    """What one run found and wrote (``written`` is False on a dry run)."""

    source: Instrument
    new_version: str
    output: Path
    targets: frozenset[tuple[str, str]]
    n_responses: int
    estimates: dict[str, Estimate]
    content: dict[str, Any]
    written: bool


# -- selecting the source mapping and the new version ----------------------------------------------


def next_patch_version(version: str) -> str:
    """``2.1.0`` -> ``2.1.1``."""
    if not _VERSION.match(version):
        raise ValueError(f"not a major.minor.patch version: {version!r}")
    major, minor, patch = version.split(".")
    return f"{major}.{minor}.{int(patch) + 1}"


def _source(
    registry: InstrumentRegistry, instrument: str, from_version: str | None, folder: Path
) -> Instrument:
    candidates = sorted((i for i in registry if i.code == instrument), key=lambda i: version_key(i.version))
    if not candidates:
        raise CalibrationRefused(f"no mapping of instrument {instrument!r} in {folder}", 2)
    if from_version is None:
        chosen = candidates[-1]
    else:
        found = [i for i in candidates if i.version == from_version]
        if not found:
            versions = ", ".join(i.version for i in candidates)
            raise CalibrationRefused(
                f"{instrument} has no mapping version {from_version} in {folder} (found: {versions})", 2
            )
        chosen = found[0]
    if not chosen.is_multiscale:
        raise CalibrationRefused(
            f"{instrument} {chosen.version} ({chosen.path.name}) is a sum score; "
            "calibrate estimates the scales of a multi-scale instrument",
            2,
        )
    return chosen


def _check_new_version(registry: InstrumentRegistry, source: Instrument, new_version: str) -> None:
    if not _VERSION.match(new_version):
        raise CalibrationRefused(f"--new-version must look like 1.2.3 (got {new_version!r})", 2)
    for inst in registry:
        if inst.code == source.code and inst.version == new_version:
            raise CalibrationRefused(
                f"refused: {source.code} {new_version} already exists ({inst.path}); "
                "give another --new-version",
                1,
            )
    if version_key(new_version) <= version_key(source.version):
        raise CalibrationRefused(
            f"--new-version {new_version} must be higher than the source version {source.version}", 2
        )
    for url, qversion in source.questionnaires():
        winner = registry.for_questionnaire(url, qversion)
        if winner is not None and version_key(winner.version) > version_key(new_version):
            raise CalibrationRefused(
                f"{winner.code} {winner.version} ({winner.path.name}) already scores {url}|{qversion} "
                f"and would still win over {new_version}; give a --new-version above {winner.version}",
                2,
            )


def pinned_questionnaires(content: Mapping[str, Any], source: Instrument) -> dict[str, Any]:
    """The source file's content with every Questionnaire canonical pinned to the version it scored."""
    out = dict(content)
    questionnaires = dict(out.get("questionnaires") or {})
    for kind, canonical in questionnaires.items():
        url, _, pinned = str(canonical).partition("|")
        questionnaires[kind] = f"{url}|{pinned or source.version}"
    out["questionnaires"] = questionnaires
    return out


def _header(path: Path) -> list[str]:
    """The comment lines at the top of a YAML file (its header), blank lines included."""
    lines: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or (not line.strip() and lines):
            lines.append(line)
            continue
        break
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


# -- reading the responses ------------------------------------------------------------------------


def counts_response(body: Mapping[str, Any], targets: frozenset[tuple[str, str]]) -> bool:
    """Whether a stored QuestionnaireResponse counts: ``completed``/``amended`` and answering one of
    ``targets`` (Questionnaire ``(url, version)``), named as ``url|version`` or by its bare url."""
    if body.get("resourceType") != "QuestionnaireResponse" or body.get("status") not in COUNTED_STATUSES:
        return False
    canonical = body.get("questionnaire")
    if not isinstance(canonical, str):
        return False
    url, bar, version = canonical.partition("|")
    if bar:
        return (url, version) in targets
    return any(url == u for u, _ in targets)


def _answer_sets(
    database_url: str, targets: frozenset[tuple[str, str]], link_ids: frozenset[str]
) -> Iterator[dict[str, str]]:
    """The clinical-scale answers (linkId -> code) of every counted response, read in keyset pages."""
    from urllib.parse import urlencode

    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from fhir_norse.auth.caller import Caller
    from fhir_norse.compose import build_reader
    from fhir_norse.server.context import RequestContext
    from fhir_norse.server.search.parse import parse_search
    from fhir_norse.store import migrate

    parsed = make_url(database_url)
    local = parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
    if local and not Path(str(parsed.database)).is_file():
        raise CalibrationRefused(f"no database at {parsed.database}", 2)
    service = build_reader(database_url)
    try:
        try:
            revision = migrate.current_revision(service.storage.engine)
        except sa.exc.SQLAlchemyError as exc:
            raise CalibrationRefused(f"cannot open the database: {exc.__class__.__name__}: {exc}", 2) from exc
        if revision is None:
            raise CalibrationRefused("the database has no schema yet; run `fhir-norse migrate` first", 2)
        # Counted responses of the target Questionnaires, by their canonical, in keyset pages; each page
        # is a search of the operator through the repository (and so in the audit trail).
        ctx = RequestContext(caller=Caller.operator(), base_url="urn:fhir-norse:calibrate")
        params = [
            ("status", ",".join(COUNTED_STATUSES)),
            ("questionnaire", ",".join(sorted({url for url, _ in targets}))),
            ("_count", str(PAGE_SIZE)),
        ]
        cursor: str | None = None
        while True:
            paged = params if cursor is None else [*params, ("_cursor", cursor)]
            request = parse_search("QuestionnaireResponse", paged, strict=True, registry=service.registry)
            with service.session(ctx) as repo:
                page = repo.search(request, query=f"QuestionnaireResponse?{urlencode(paged)}")
            for row in page.matches:
                body = orjson.loads(row.body_text) if row.body_text else None
                if isinstance(body, dict) and counts_response(body, targets):
                    answers = answers_from_response(body)
                    yield {k: sys.intern(v) for k, v in answers.items() if k in link_ids}
            cursor = page.next_cursor
            if cursor is None:
                break
    finally:
        service.storage.engine.dispose()


# -- the command ----------------------------------------------------------------------------------


def calibrate(
    database_url: str,
    content_dir: Path,
    *,
    instrument: str = "nf21",
    from_version: str | None = None,
    new_version: str | None = None,
    min_complete: int = DEFAULT_MIN_COMPLETE,
    output: Path | None = None,
    dry_run: bool = False,
    today: date | None = None,
) -> Calibration:
    """Estimate, and (unless ``dry_run``) write the new mapping version; see the module doc.

    Raises :class:`CalibrationRefused` with the exit code when it cannot or will not write.
    """
    if min_complete < 2:
        raise CalibrationRefused(f"--min-complete must be at least 2 (got {min_complete})", 2)
    folder = Path(content_dir) / "mappings"
    if not folder.is_dir():
        raise CalibrationRefused(f"no mappings/ folder in {content_dir}", 2)
    try:
        registry = InstrumentRegistry.from_content_dir(Path(content_dir))
    except ContentError as exc:
        raise CalibrationRefused(f"content refused: {exc}", 2) from exc
    source = _source(registry, instrument, from_version, folder)
    version = new_version or next_patch_version(source.version)
    _check_new_version(registry, source, version)
    target = Path(output) if output is not None else folder / f"{source.code}-{version}.yaml"
    if target.exists():
        raise CalibrationRefused(f"refused: {target} already exists (it is never overwritten)", 1)

    mapping = source.mapping
    assert isinstance(mapping, InstrumentMapping)  # checked by _source
    targets = frozenset(source.questionnaires())
    link_ids = frozenset(i for scale in mapping.scales for i in scale.items)
    answer_sets = list(_answer_sets(database_url, targets, link_ids))
    estimates = estimate_reliabilities(answer_sets, mapping, min_complete=min_complete)
    when = today or datetime.now(UTC).date()
    raw = yaml.load(source.path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    content = calibrated_mapping(
        pinned_questionnaires(raw, source), estimates, new_version=version, when=when
    )
    result = Calibration(
        source, version, target, targets, len(answer_sets), estimates, content, written=False
    )
    if not any(usable_alpha(e) is not None for e in estimates.values()):
        raise CalibrationRefused(
            f"nothing estimable: no scale has {min_complete} complete administrations with a usable "
            f"alpha among {len(answer_sets)} completed or amended responses; nothing written",
            1,
            table=render_table(result),
        )
    if dry_run:
        return result
    header = _header(source.path)
    estimated = sum(usable_alpha(e) is not None for e in estimates.values())
    header += textwrap.wrap(
        f"Calibrated by `fhir-norse calibrate` on {when.isoformat()} from {source.code} {source.version}: "
        f"Cronbach's alpha of {estimated} of {len(estimates)} scales from {len(answer_sets)} completed or "
        "amended QuestionnaireResponses (assumed: false); the other scales keep their reliability.",
        width=_HEADER_WIDTH,
        initial_indent="# ",
        subsequent_indent="#   ",
        break_on_hyphens=False,
    )
    try:
        write_mapping(target, content)
    except FileExistsError as exc:
        raise CalibrationRefused(f"refused: {target} already exists (it is never overwritten)", 1) from exc
    except OSError as exc:
        raise CalibrationRefused(f"cannot write {target}: {exc}", 2) from exc
    # write_mapping writes YAML only; the header (comments) goes in front of it.
    target.write_text("\n".join(header) + "\n" + target.read_text(encoding="utf-8"), encoding="utf-8")
    return Calibration(source, version, target, targets, len(answer_sets), estimates, content, written=True)


def render_table(result: Calibration) -> str:
    """One line per scale: items, complete administrations, alpha, and the reliability kept."""
    mapping = result.source.mapping
    assert isinstance(mapping, InstrumentMapping)
    canonicals = ", ".join(f"{u}|{v}" for u, v in sorted(result.targets))
    lines = [
        f"{result.source.code} {result.source.version} -> {result.new_version}: "
        f"{result.n_responses} completed or amended responses to {canonicals}",
        f"{'scale':<14} {'items':>5} {'complete':>8}  {'alpha':<14} reliability",
    ]
    for scale in mapping.scales:
        estimate = result.estimates[scale.code]
        value = usable_alpha(estimate)
        alpha = "not estimable" if estimate.alpha is None else f"{estimate.alpha:.3f}"
        if value is not None:
            kept = f"{value:g} (new, from alpha)"
        else:
            r = scale.reliability
            kept = f"{r.value:g} (kept{', assumed' if r.assumed else ''})"
        lines.append(f"{scale.code:<14} {estimate.n_items:>5} {estimate.n_complete:>8}  {alpha:<14} {kept}")
    return "\n".join(lines)


# -- argparse -----------------------------------------------------------------------------------


def register_commands(subparsers: Any) -> None:
    """Add ``calibrate`` to the ``fhir-norse`` subcommands (dest ``command``)."""
    parser = subparsers.add_parser(
        "calibrate",
        help="estimate reliabilities (Cronbach's alpha) into a new mapping version; restart the server after",
        description=(
            "Estimate each scale's internal consistency (Cronbach's alpha) from the completed and "
            "amended QuestionnaireResponses in the database and write it as a new mapping version "
            "(assumed: false) that scores the same Questionnaire version. Restart the server to load "
            "the new mapping. Exit 0 written, 1 nothing estimable or refused, 2 bad arguments."
        ),
    )
    parser.add_argument("--database-url", help="SQLAlchemy URL (env FHIR_NORSE_DATABASE_URL)")
    parser.add_argument(
        "--content-dir",
        help="the content pack with mappings/ (env FHIR_NORSE_CONTENT_DIR; default: this checkout)",
    )
    parser.add_argument("--instrument", default="nf21", help="instrument code (default nf21)")
    parser.add_argument("--from-version", help="the mapping version to calibrate (default: the highest)")
    parser.add_argument("--new-version", help="version of the new mapping (default: the source's patch + 1)")
    parser.add_argument(
        "--min-complete",
        type=int,
        default=DEFAULT_MIN_COMPLETE,
        help=f"complete administrations a scale needs for an estimate (default {DEFAULT_MIN_COMPLETE})",
    )
    parser.add_argument(
        "--output", help="file to write (default <content-dir>/mappings/<instrument>-<new version>.yaml)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the estimates; write nothing")


def run_command(args: argparse.Namespace, settings: Any) -> int:
    """Run ``calibrate``; the table on stdout, messages on stderr; the exit code."""
    content_dir = Path(args.content_dir) if args.content_dir else Path(settings.content_dir)
    try:
        result = calibrate(
            settings.database_url,
            content_dir,
            instrument=args.instrument,
            from_version=args.from_version,
            new_version=args.new_version,
            min_complete=args.min_complete,
            output=Path(args.output) if args.output else None,
            dry_run=args.dry_run,
        )
    except CalibrationRefused as exc:
        if exc.table:
            print(exc.table)
        print(f"fhir-norse calibrate: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:
        print(f"fhir-norse calibrate: {exc}", file=sys.stderr)
        return 2
    print(render_table(result))
    folder = result.source.path.parent
    if result.written and result.output.resolve().parent != folder.resolve():
        print(
            f"wrote {result.output} ({result.source.code} {result.new_version}); the server loads "
            f"mappings from {folder} only: move it there and restart the server to use it",
            file=sys.stderr,
        )
    elif result.written:
        print(
            f"wrote {result.output} ({result.source.code} {result.new_version}); "
            "restart the server to load it",
            file=sys.stderr,
        )
    else:
        print(f"dry run: would write {result.output}; nothing written", file=sys.stderr)
    return 0
