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

With ``--expected-recovery`` (issue 19) the same pass over the responses also yields the series of
each completed episode (:func:`recovery_sample`), and each scale's and the alliance total's
expected-recovery curve is fitted (:mod:`fhir_norse.scoring.recovery`, at least ``--min-episodes``
episodes) and written as its ``expected_recovery`` block; with too little data for any curve nothing is
written (exit 1). Progress goes to stderr.

Exit codes: 0 written (or, with ``--dry-run``, would be written), 1 nothing estimable or refused,
2 bad arguments, content or settings. Wire with ``register_commands(subparsers)`` and, for
``args.command in COMMANDS``, ``run_command(args, settings)``.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import yaml

from fhir_norse.instruments.registry import Instrument, InstrumentRegistry, version_key
from fhir_norse.instruments.schema import ContentError, InstrumentMapping
from fhir_norse.scoring.calibrate import (
    ALLIANCE_KEY_PREFIX,
    DEFAULT_MIN_COMPLETE,
    Estimate,
    RecoveryFit,
    calibrated_mapping,
    estimate_reliabilities,
    fit_expected_recovery,
    usable_alpha,
    with_expected_recovery,
    write_mapping,
)
from fhir_norse.scoring.engine import answers_from_response
from fhir_norse.scoring.recovery import DEFAULT_BAND_PERCENTILES, DEFAULT_MIN_EPISODES, Episode

__all__ = [
    "COMMANDS",
    "COUNTED_STATUSES",
    "Calibration",
    "CalibrationRefused",
    "RecoverySample",
    "calibrate",
    "counts_response",
    "next_patch_version",
    "pinned_questionnaires",
    "recovery_sample",
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
    # --expected-recovery: the fit per scale (and alliance:<total>) and the sample it was fitted on.
    recovery: dict[str, RecoveryFit] = field(default_factory=dict)
    sample: str | None = None


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


@contextmanager
def _reader(database_url: str) -> Iterator[Any]:
    """The generic server on ``database_url`` (:func:`fhir_norse.compose.build_reader`), checked to hold
    a schema; disposed of at the end."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from fhir_norse.compose import build_reader
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
        yield service
    finally:
        service.storage.engine.dispose()


def _pages(service: Any, res_type: str, params: Sequence[tuple[str, str]]) -> Iterator[list[Any]]:
    """The matches of a search, page by page (keyset); each page is a search of the operator through
    the repository (and so in the audit trail)."""
    from urllib.parse import urlencode

    from fhir_norse.auth.caller import Caller
    from fhir_norse.server.context import RequestContext
    from fhir_norse.server.search.parse import parse_search

    ctx = RequestContext(caller=Caller.operator(), base_url="urn:fhir-norse:calibrate")
    cursor: str | None = None
    while True:
        paged = list(params) if cursor is None else [*params, ("_cursor", cursor)]
        request = parse_search(res_type, paged, strict=True, registry=service.registry)
        with service.session(ctx) as repo:
            page = repo.search(request, query=f"{res_type}?{urlencode(paged)}")
        yield list(page.matches)
        cursor = page.next_cursor
        if cursor is None:
            break


def _responses(service: Any, targets: frozenset[tuple[str, str]], progress: Any = None) -> Iterator[Any]:
    """Every counted response (its stored JSON, parsed), read in keyset pages."""
    params = [
        ("status", ",".join(COUNTED_STATUSES)),
        ("questionnaire", ",".join(sorted({url for url, _ in targets}))),
        ("_count", str(PAGE_SIZE)),
    ]
    started = time.perf_counter()
    read = 0
    for matches in _pages(service, "QuestionnaireResponse", params):
        for row in matches:
            body = orjson.loads(row.body_text) if row.body_text else None
            if isinstance(body, dict) and counts_response(body, targets):
                body["id"] = row.res_id
                yield body
        read += len(matches)
        if progress is not None and matches:
            print(
                f"calibrate: {read} responses read in {time.perf_counter() - started:.1f} s",
                file=progress,
                flush=True,
            )


def _answers(body: Mapping[str, Any], link_ids: frozenset[str]) -> dict[str, str]:
    return {k: sys.intern(v) for k, v in answers_from_response(body).items() if k in link_ids}


def _answer_sets(
    database_url: str, targets: frozenset[tuple[str, str]], link_ids: frozenset[str]
) -> Iterator[dict[str, str]]:
    """The clinical-scale answers (linkId -> code) of every counted response, read in keyset pages."""
    with _reader(database_url) as service:
        for body in _responses(service, targets):
            yield _answers(body, link_ids)


@dataclass
class RecoverySample:
    """The episodes' score series per scale (and ``alliance:<total>``) and what the sample is."""

    series: dict[str, list[Episode]]
    description: str
    n_episodes: int  # episodes in the sample (counted for a scale or not)


def _episodes(service: Any) -> tuple[set[str], str]:
    """The ``EpisodeOfCare/<id>`` of the sample: the finished episodes, or every stored one when none
    is finished; and the words for it."""
    finished: set[str] = set()
    for matches in _pages(service, "EpisodeOfCare", [("status", "finished"), ("_count", str(PAGE_SIZE))]):
        finished.update(f"EpisodeOfCare/{row.res_id}" for row in matches)
    if finished:
        return finished, "finished EpisodeOfCare"
    every: set[str] = set()
    for matches in _pages(service, "EpisodeOfCare", [("_count", str(PAGE_SIZE))]):
        every.update(f"EpisodeOfCare/{row.res_id}" for row in matches)
    return every, "every EpisodeOfCare (none is finished)"


def _administrations(service: Any, episodes: set[str]) -> dict[str, tuple[str, str]]:
    """DiagnosticReport id -> (episode, when) of the scored administrations in ``episodes``: the
    ``rom-report`` that scoring wrote for each (``final`` or ``amended``), which carries the episode and
    the time the answers were given as scoring saw them."""
    from fhir_norse.adaptive.history import episode_of

    out: dict[str, tuple[str, str]] = {}
    params = [("status", "final,amended"), ("_count", str(PAGE_SIZE * 2))]
    for matches in _pages(service, "DiagnosticReport", params):
        for row in matches:
            body = orjson.loads(row.body_text) if row.body_text else {}
            episode = episode_of(body)
            when = body.get("effectiveDateTime")
            if episode in episodes and isinstance(when, str):
                out[row.res_id] = (str(episode), when)
    return out


def recovery_sample(
    database_url: str,
    targets: frozenset[tuple[str, str]],
    mapping: InstrumentMapping,
    *,
    link_ids: frozenset[str] = frozenset(),
    answer_sets: list[dict[str, str]] | None = None,
    progress: Any = None,
) -> RecoverySample:
    """The score series of the completed episodes (module doc of :mod:`fhir_norse.scoring.recovery`).

    The sample: the EpisodeOfCare with status ``finished`` (when the database has none, every stored
    episode, and the sample says so). An administration is a counted response whose scoring wrote its
    DiagnosticReport in one of those episodes; administrations are numbered from 1 (intake) in the
    order of the report's time within the episode, as scoring numbers a patient's history. Each is
    scored again with ``mapping`` (the engine, :func:`~fhir_norse.scoring.score_nf21`, at the
    instrument's precision: the scores scoring stored for the same mapping), which reads one response
    per administration instead of its twenty-odd score Observations. When ``answer_sets`` is given,
    the same pass appends each counted response's clinical answers (``link_ids``) to it, for alpha.
    """
    from fhir_norse.adaptive.history import moment
    from fhir_norse.rom.intake import derived_id
    from fhir_norse.scoring.engine import score_nf21

    codes = [s.code for s in mapping.scales]
    total = mapping.alliance.total
    with _reader(database_url) as service:
        episodes, description = _episodes(service)
        reports = _administrations(service, episodes) if episodes else {}
        by_episode: dict[str, list[tuple[Any, str, dict[str, float | None], float | None]]] = {}
        patients: dict[str, str] = {}
        for body in _responses(service, targets, progress):
            if answer_sets is not None:
                answer_sets.append(_answers(body, link_ids))
            found = reports.get(derived_id(str(body["id"]), "report"))
            if found is None:
                continue
            episode, when = found
            scores = score_nf21(answers_from_response(body), mapping)
            scales = {code: scores.scales[code].score if code in scores.scales else None for code in codes}
            by_episode.setdefault(episode, []).append(
                (moment(when), str(body["id"]), scales, scores.alliance.total.mean)
            )
            patients[episode] = str((body.get("subject") or {}).get("reference"))
    series: dict[str, list[Episode]] = {k: [] for k in [*codes, ALLIANCE_KEY_PREFIX + total]}
    for episode, administrations in by_episode.items():
        administrations.sort(key=lambda a: (a[0], a[1]))
        patient = patients[episode]
        for code in codes:
            series[code].append(Episode(patient, [a[2][code] for a in administrations]))
        series[ALLIANCE_KEY_PREFIX + total].append(Episode(patient, [a[3] for a in administrations]))
    return RecoverySample(series, description, len(by_episode))


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
    expected_recovery: bool = False,
    min_episodes: int = DEFAULT_MIN_EPISODES,
    band: tuple[float, float] = DEFAULT_BAND_PERCENTILES,
    progress: Any = None,
) -> Calibration:
    """Estimate, and (unless ``dry_run``) write the new mapping version; see the module doc.

    ``expected_recovery`` also fits the expected-recovery curves (at least ``min_episodes`` counted
    episodes per scale), its band bounded by the residual percentiles ``band`` (low, high); then nothing
    is written unless at least one curve could be fitted.
    ``progress`` (a text stream) follows the reading of the episodes. Raises
    :class:`CalibrationRefused` with the exit code when it cannot or will not write.
    """
    if min_complete < 2:
        raise CalibrationRefused(f"--min-complete must be at least 2 (got {min_complete})", 2)
    if min_episodes < 2:
        raise CalibrationRefused(f"--min-episodes must be at least 2 (got {min_episodes})", 2)
    if not 0 <= band[0] < band[1] <= 100:
        raise CalibrationRefused(f"--band must be LOW,HIGH with 0 <= LOW < HIGH <= 100 (got {band})", 2)
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
    fits: dict[str, RecoveryFit] = {}
    sample_text: str | None = None
    when = today or datetime.now(UTC).date()
    if expected_recovery:
        # One pass over the responses serves both: alpha and the episodes' series.
        answer_sets: list[dict[str, str]] = []
        sample = recovery_sample(
            database_url, targets, mapping, link_ids=link_ids, answer_sets=answer_sets, progress=progress
        )
        fits = fit_expected_recovery(
            sample.series, mapping, when=when, min_episodes=min_episodes, percentiles=band
        )
        sample_text = (
            f"{sample.n_episodes} episodes ({sample.description}) of this server, read {when.isoformat()}"
        )
    else:
        answer_sets = list(_answer_sets(database_url, targets, link_ids))
    estimates = estimate_reliabilities(answer_sets, mapping, min_complete=min_complete)
    raw = yaml.load(source.path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    content = calibrated_mapping(
        pinned_questionnaires(raw, source), estimates, new_version=version, when=when
    )
    if expected_recovery:
        assert sample_text is not None
        content = with_expected_recovery(content, fits, sample=sample_text)
    result = Calibration(
        source,
        version,
        target,
        targets,
        len(answer_sets),
        estimates,
        content,
        written=False,
        recovery=fits,
        sample=sample_text,
    )
    fitted = sum(f.model is not None for f in fits.values())
    if expected_recovery and not fitted:
        raise CalibrationRefused(
            f"too little data for an expected-recovery curve: no scale has {min_episodes} episodes with "
            "an intake and at least 2 later scored administrations; nothing written",
            1,
            table=render_table(result),
        )
    if not expected_recovery and not any(usable_alpha(e) is not None for e in estimates.values()):
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
    if expected_recovery:
        header += textwrap.wrap(
            f"Expected-recovery curves (issue 19, expected_recovery) of {fitted} of {len(fits)} scales "
            f"and the alliance total, fitted on {sample_text}; the other scales keep theirs, if any. "
            "not_on_track_signal switches the signal on per scale.",
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
    return replace(result, written=True)


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
    if result.recovery:
        lines += _recovery_table(mapping, result.recovery, result.sample)
    return "\n".join(lines)


def _recovery_table(
    mapping: InstrumentMapping, fits: Mapping[str, RecoveryFit], sample: str | None
) -> list[str]:
    """One line per scale and the alliance total: episodes counted, and the curve and band fitted."""
    lines = [
        f"expected recovery ({sample}):",
        f"{'scale':<14} {'episodes':>8} {'patients':>8}  curve at k=2..max (intake 4)       band",
    ]
    for key in [s.code for s in mapping.scales] + [ALLIANCE_KEY_PREFIX + mapping.alliance.total]:
        fit = fits[key]
        m = fit.model
        if m is None:
            lines.append(
                f"{key:<14} {fit.n_counted:>8} {'':>8}  too few episodes (minimum {fit.min_episodes})"
            )
            continue
        last = m.max_administration
        curve = f"{m.expected(2, 4.0):.2f} -> {m.expected(last, 4.0):.2f} at k={last}"
        band = f"{m.band_low:+.2f} / {m.band_high:+.2f}"
        lines.append(f"{key:<14} {m.n_episodes:>8} {m.n_patients:>8}  {curve:<32} {band}")
    return lines


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
    parser.add_argument(
        "--expected-recovery",
        action="store_true",
        help="also fit each scale's expected-recovery curve from the finished episodes (issue 19)",
    )
    parser.add_argument(
        "--min-episodes",
        type=int,
        default=DEFAULT_MIN_EPISODES,
        help=(
            "episodes (an intake and >= 2 later scored administrations) a scale needs for an "
            f"expected-recovery curve (default {DEFAULT_MIN_EPISODES})"
        ),
    )
    parser.add_argument(
        "--band",
        type=_band,
        default=DEFAULT_BAND_PERCENTILES,
        metavar="LOW,HIGH",
        help=(
            "the residual percentiles that bound an expected-recovery curve's tolerance band "
            f"(default {DEFAULT_BAND_PERCENTILES[0]:g},{DEFAULT_BAND_PERCENTILES[1]:g})"
        ),
    )


def _band(text: str) -> tuple[float, float]:
    """``LOW,HIGH`` percentiles, ``0 <= LOW < HIGH <= 100`` (argparse reports a bad value)."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH percentiles, got {text!r}") from None
    if not 0 <= low < high <= 100:
        raise argparse.ArgumentTypeError(f"expected 0 <= LOW < HIGH <= 100, got {text!r}")
    return low, high


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
            expected_recovery=args.expected_recovery,
            min_episodes=args.min_episodes,
            band=args.band,
            progress=sys.stderr,
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
