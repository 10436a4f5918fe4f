"""A patient's record for adaptive administration, read through the repository: the episode and context
of an administration, the scored history, the clinician overrides, and the scale state they give.

* **Episode.** An administration belongs to the EpisodeOfCare its response names (extension
  ``workflow-episodeOfCare``), else the episode of its ``encounter``, else the patient's only active
  EpisodeOfCare, else none. Scale state, change and the intake context are counted within the episode
  (administrations without an episode form one series of their own).
* **Context.** ``administration-context`` (intake | weekly | termination) from the response; without one,
  ``intake`` for the first administration of the episode and ``weekly`` after it. Contexts listed in the
  mapping's ``full_bank_contexts`` ask every scale in full.
* **State.** :func:`fhir_norse.adaptive.state.scale_states` over the episode's scored administrations
  (:mod:`fhir_norse.adaptive.history`) with the active overrides. Nothing else is kept between calls
  but what is derived from stored versions (each read every time): the facts of each Observation version,
  and a patient's administrations while the versions found are the same.
* **Overrides** are ``ServiceRequest`` resources (profile ``rom-scale-override``): ``code`` the scale,
  ``doNotPerform`` false to force it open (asked in full every time) or true to force it closed (only the
  trigger), ``requester`` who, ``authoredOn`` when, ``reasonCode``/``note`` why, ``status`` active while
  it holds (revoked, completed or entered-in-error lifts it), optionally limited to an episode with the
  ``workflow-episodeOfCare`` extension. They are read, searched, changed and audited like any resource
  (every write has its AuditEvent and its version in the history); the newest active one per scale wins.
* **Operations**: ``Questionnaire/$next-question`` (SDC adaptive forms), ``Patient/{id}/$tailored-form``
  (a tailored static Questionnaire), ``Questionnaire/$populate`` (the same form contained in a
  QuestionnaireResponse to fill), and ``Patient/{id}/$adaptive-state`` (the state, scale by scale).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from fhir_norse.adaptive.forms import AdministrationPlan
from fhir_norse.adaptive.history import (
    CONTEXT_EXTENSION,
    CS_CONTEXT,
    EPISODE_EXTENSION,
    Administration,
    Fact,
    episode_of,
    fact_of,
    from_facts,
    moment,
)
from fhir_norse.adaptive.state import Override, ScaleState, scale_states
from fhir_norse.canonicals import CS_ROM, CS_SCALES, PROFILE_OVERRIDE
from fhir_norse.instruments.registry import Instrument, InstrumentRegistry
from fhir_norse.instruments.schema import InstrumentMapping
from fhir_norse.server.repository import JsonDict, Repository, loads
from fhir_norse.server.resources import reference_id
from fhir_norse.server.search.typed import Where

OVERRIDE_CATEGORY = "scale-override"
SDC_QR_ADAPT = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaireresponse-adapt"
SDC_Q_ADAPT = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-adapt"
SDC_ADAPTIVE = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-questionnaireAdaptive"
CONTEXTS = ("intake", "weekly", "termination")
_LIMIT = 100_000
# Observation versions the history memo holds in all, per process (:class:`HistoryMemo`).
_MEMO_ROWS = 60_000
_QR = "QuestionnaireResponse"
_CONTEXT_DISPLAY = {"intake": "Intake", "weekly": "Weekly", "termination": "Termination"}


def context_extension(code: str) -> JsonDict:
    return {
        "url": CONTEXT_EXTENSION,
        "valueCoding": {"system": CS_CONTEXT, "code": code, "display": _CONTEXT_DISPLAY.get(code, code)},
    }


def episode_extension(episode: str) -> JsonDict:
    return {"url": EPISODE_EXTENSION, "valueReference": {"reference": episode}}


@dataclass(frozen=True)
class OverrideRecord:
    """One active clinician override, as the state operation shows it."""

    scale: str
    override: Override
    request: str  # ServiceRequest/<id>
    requester: str | None
    authored: str | None
    reason: str | None


@dataclass
class PatientState:
    """Everything adaptive administration knows about one patient (in one episode) right now."""

    mapping: InstrumentMapping
    patient: str  # Patient/<id>
    episode: str | None
    context: str
    history: list[Administration]
    states: dict[str, ScaleState]
    overrides: dict[str, OverrideRecord] = field(default_factory=dict)

    @property
    def plan(self) -> AdministrationPlan:
        return AdministrationPlan(
            self.mapping, self.states, full_bank=self.context in self.mapping.full_bank_contexts
        )


def override_of(body: Mapping[str, Any]) -> tuple[str, Override] | None:
    """(scale code, 'open' | 'closed') of an active scale-override ServiceRequest, else None."""
    if body.get("status") != "active" or not is_override(body):
        return None
    code = next(
        (c.get("code") for c in (body.get("code") or {}).get("coding") or [] if c.get("system") == CS_SCALES),
        None,
    )
    if not isinstance(code, str):
        return None
    return code, ("closed" if body.get("doNotPerform") is True else "open")


def is_override(body: Mapping[str, Any]) -> bool:
    """Whether a ServiceRequest is a clinician scale override (by profile or category)."""
    if PROFILE_OVERRIDE in ((body.get("meta") or {}).get("profile") or []):
        return True
    return any(
        c.get("system") == CS_ROM and c.get("code") == OVERRIDE_CATEGORY
        for cat in body.get("category") or []
        for c in cat.get("coding") or []
    )


class AdaptiveService:
    """Reads the stored history and overrides of a patient and turns them into the adaptive plan."""

    def __init__(self, registry: InstrumentRegistry) -> None:
        self.registry = registry
        # Derived from stored versions (immutable), not state: the same answers with an empty memo.
        self.histories = HistoryMemo()

    # ------------------------------------------------------------------ instruments
    def adaptive_mappings(self) -> list[InstrumentMapping]:
        return [i.mapping for i in self.registry if isinstance(i.mapping, InstrumentMapping)]

    def instrument(self, canonical: str) -> Instrument | None:
        url, _, version = canonical.partition("|")
        return self.registry.for_questionnaire(url, version or None)

    # ------------------------------------------------------------------ reads
    def episode(self, repo: Repository, response: Mapping[str, Any]) -> str | None:
        """The EpisodeOfCare of an administration (module doc)."""
        explicit = episode_of(response)
        if explicit is not None:
            return explicit
        encounter_id = reference_id((response.get("encounter") or {}).get("reference"), "Encounter")
        if encounter_id is not None:
            stored = repo.get("Encounter", encounter_id)
            if stored is not None:
                episodes = loads(stored.body_text).get("episodeOfCare") or []
                ref = (episodes[0] if episodes else {}).get("reference")
                if reference_id(ref, "EpisodeOfCare") is not None:
                    return f"EpisodeOfCare/{reference_id(ref, 'EpisodeOfCare')}"
        patient = (response.get("subject") or {}).get("reference")
        if not isinstance(patient, str):
            return None
        return self.active_episode(repo, patient)

    def active_episode(self, repo: Repository, patient_ref: str) -> str | None:
        where = Where("EpisodeOfCare", references={"patient": patient_ref}, tokens={"status": "active"})
        found = repo.find(where, 2)
        return f"EpisodeOfCare/{found[0].res_id}" if len(found) == 1 else None

    def history(
        self,
        repo: Repository,
        patient_ref: str,
        mapping: InstrumentMapping,
        episode: str | None,
        *,
        exclude_response: str | None = None,
    ) -> list[Administration]:
        """The patient's scored administrations of ``mapping`` in ``episode``, oldest first (scale
        and alliance scores)."""
        # By subject only, filtered here: adding ``code`` makes PostgreSQL without fresh statistics
        # plan a nested loop over every code row (1.4 s seen); the facts of other Observations are
        # remembered as "nothing" after their first read.
        scales = frozenset(s.code for s in mapping.scales)
        # Ids and versions first; only the versions not read before are fetched and parsed.
        found = repo.find_versions(Where("Observation", references={"subject": patient_ref}), _LIMIT)
        versions = [(pk, version) for pk, _, version in found]
        memo_key = (patient_ref, scales)
        memo = self.histories.get(memo_key)
        if memo is not None and list(memo.facts) == versions:
            every = memo.every  # the same stored versions as last time: the same administrations
        else:
            facts = _facts_of(repo, versions, scales, memo.facts if memo is not None else {})
            every = from_facts(facts.values())
            self.histories.put(memo_key, _History(facts, every))
        return [a for a in every if a.episode == episode and a.response != exclude_response]

    def overrides(self, repo: Repository, patient_ref: str, episode: str | None) -> dict[str, OverrideRecord]:
        """The active overrides for the patient (episode-bound ones only in their episode)."""
        found = repo.find(Where("ServiceRequest", references={"subject": patient_ref}), _LIMIT)
        chosen: dict[str, tuple[str, OverrideRecord]] = {}
        for stored in found:
            body = loads(stored.body_text)
            parsed = override_of(body)
            if parsed is None:
                continue
            bound = episode_of(body)
            if bound is not None and bound != episode:
                continue
            scale, kind = parsed
            authored = body.get("authoredOn")
            reason = "; ".join(
                [str(r.get("text")) for r in body.get("reasonCode") or [] if r.get("text")]
                + [str(n.get("text")) for n in body.get("note") or [] if n.get("text")]
            )
            record = OverrideRecord(
                scale,
                kind,
                f"ServiceRequest/{stored.res_id}",
                (body.get("requester") or {}).get("reference"),
                authored,
                reason or None,
            )
            rank = f"{moment(authored).isoformat() if authored else ''}|{stored.last_updated}"
            if scale not in chosen or rank > chosen[scale][0]:
                chosen[scale] = (rank, record)
        return {scale: record for scale, (_, record) in chosen.items()}

    def patient_state(
        self,
        repo: Repository,
        patient_ref: str,
        mapping: InstrumentMapping,
        *,
        episode: str | None,
        context: str | None,
        exclude_response: str | None = None,
        before: str | None = None,
    ) -> PatientState:
        """The state before the next administration (or before ``before``, an ``authored`` time)."""
        history = self.history(repo, patient_ref, mapping, episode, exclude_response=exclude_response)
        return self.state_from(
            repo, patient_ref, mapping, history, episode=episode, context=context, before=before
        )

    def state_from(
        self,
        repo: Repository,
        patient_ref: str,
        mapping: InstrumentMapping,
        administrations: Sequence[Administration],
        *,
        episode: str | None,
        context: str | None,
        before: str | None = None,
    ) -> PatientState:
        """The state from administrations already read (see :meth:`history`), with the overrides."""
        history = list(administrations)
        if before is not None:
            cutoff = moment(before)
            history = [a for a in history if moment(a.authored) < cutoff]
        overrides = self.overrides(repo, patient_ref, episode)
        states = scale_states(
            mapping, [a.measured for a in history], {s: o.override for s, o in overrides.items()}
        )
        resolved = context or ("intake" if not history else "weekly")
        return PatientState(mapping, patient_ref, episode, resolved, history, states, overrides)


def _parse_fact(text: str | None, scales: frozenset[str], shared: dict[str, str]) -> Fact | None:
    # Cheap filter before parsing: only scale and alliance scores matter here.
    if not text or ("/nf21-scales" not in text and "/nf21-alliance" not in text):
        return None
    fact = fact_of(orjson.loads(text), scales)
    if fact is None:
        return None
    # The twenty-odd facts of one administration repeat its response id, times, episode and context,
    # and every fact a system and a scale code: one string each instead of one per fact and field
    # (the memo holds them for as long as the patient stays in it).
    return Fact(
        shared.setdefault(fact.response, fact.response),
        shared.setdefault(fact.authored, fact.authored),
        None if fact.episode is None else shared.setdefault(fact.episode, fact.episode),
        None if fact.context is None else shared.setdefault(fact.context, fact.context),
        shared.setdefault(fact.system, fact.system),
        shared.setdefault(fact.code, fact.code),
        fact.value,
        fact.measured,
    )


_Version = tuple[int, int]  # (row pk, version) of a stored Observation


def _facts_of(
    repo: Repository,
    versions: Sequence[_Version],
    scales: frozenset[str],
    known: Mapping[_Version, Fact | None],
) -> dict[_Version, Fact | None]:
    """The fact of each stored version, in order; only the versions not ``known`` are fetched."""
    missing = [pk for pk, version in versions if (pk, version) not in known]
    texts = repo.bodies(missing) if missing else {}
    shared: dict[str, str] = {}
    return {
        (pk, version): known[(pk, version)]
        if (pk, version) in known
        else _parse_fact(texts.get(pk), scales, shared)
        for pk, version in versions
    }


@dataclass(slots=True)
class _History:
    """A patient's administrations and the facts of the stored versions they were derived from."""

    facts: dict[_Version, Fact | None]  # in the order the versions were found
    every: list[Administration]


class HistoryMemo:
    """The patients' histories last derived (:meth:`AdaptiveService.history`), least recently used out
    first once they hold more than ``limit_rows`` Observation versions in all.

    Bounded by versions rather than patients: a patient's history grows with every administration
    (about 35 Observations each), so a count of patients put no bound on the bytes. A version costs
    about 300 bytes here (its key, and its fact when it is a score: 17.7 MB for the 60,000 of the
    soak in BENCHMARKS.md, "Soak memory"), so the default holds about 18 MB per process. The
    20-client soak (100 patients round robin) fills it in about four minutes; after that the
    least recently used patients are read afresh, at no measurable cost to its throughput. A
    patient whose history alone is over the bound is derived afresh every time."""

    def __init__(self, limit_rows: int = _MEMO_ROWS) -> None:
        self.limit_rows = limit_rows
        self.rows = 0
        self._entries: OrderedDict[tuple[str, frozenset[str]], _History] = OrderedDict()
        self._lock = threading.Lock()  # request threads share the memo; the count must stay exact

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, frozenset[str]]) -> _History | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple[str, frozenset[str]], entry: _History) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.rows -= len(old.facts)
            if len(entry.facts) > self.limit_rows:
                return
            self._entries[key] = entry
            self.rows += len(entry.facts)
            while self.rows > self.limit_rows:
                _, evicted = self._entries.popitem(last=False)
                self.rows -= len(evicted.facts)
