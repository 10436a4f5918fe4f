"""Mapping files load through their schemas; errors name the file and the field."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import yaml

from fhir_norse.instruments import (
    ContentError,
    InstrumentMapping,
    SumScoreMapping,
    load_any_mapping,
    load_mapping,
)

ROOT = Path(__file__).resolve().parents[2]
NF21 = ROOT / "mappings" / "nf21-2.1.0.yaml"
NF22 = ROOT / "mappings" / "nf21-2.2.0.yaml"
CSV = ROOT.parent / "shared" / "domain" / "nf21-scales.csv"


def _broken(tmp_path: Path, change: Any) -> Path:
    data = yaml.safe_load(NF21.read_text(encoding="utf-8"))
    change(data)
    out = tmp_path / "mappings" / NF21.name
    out.parent.mkdir(parents=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out


def test_nf21_mapping_loads_with_the_instrument_structure() -> None:
    m = load_mapping(NF21)
    assert m.version == "2.1.0"
    assert len(m.scales) == 20
    assert sum(len(s.items) for s in m.scales) == 86
    assert len([s for s in m.scales if s.trigger]) == 19
    sub_recov = m.scale("subRecov")
    assert sub_recov.trigger is None and sub_recov.opens_on == "subUse"
    assert m.trigger_of(sub_recov) == m.scale("subUse").trigger
    assert len(m.alliance.items) == 4 and m.alliance.max_raw == 28
    assert len(m.preferences) == 5 and len(m.single) == 5 and len(m.medication) == 2
    assert m.close_min_administrations == 3
    assert m.answer_handling.not_relevant.clinical_scales == 1
    assert m.answer_handling.not_relevant.alliance == "missing"
    assert m.answer_handling.prefer_not.clinical_scales == "missing"
    assert all(s.reliability.assumed and s.reliability.value == 0.80 for s in m.scales)


@pytest.mark.skipif(not CSV.exists(), reason="the shared domain CSV is not beside the repository")
@pytest.mark.parametrize("path", [NF21, NF22], ids=lambda p: p.stem)
def test_nf21_mapping_numbers_are_the_csv_numbers(path: Path) -> None:
    m = load_mapping(path)
    with CSV.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [s.code for s in m.scales] == [r["scale"] for r in rows]
    for s, r in zip(m.scales, rows, strict=True):
        assert len(s.items) == int(r["n_items"])
        assert s.open_if_trigger_gt == float(r["open_if_trigger_gt"])
        assert s.close_if_mean_last3_lt == float(r["close_if_mean_last3_lt"])
        if m.version == "2.1.0":
            # 2.1.0 published the norms rounded to two decimals and keeps them (its stored z and T
            # scores stay reproducible); from 2.2.0 on they are the published table's, exactly.
            expected = (round(float(r["norm_mean"]), 2), round(float(r["norm_sd"]), 2), int(r["norm_n"]))
        else:
            expected = (float(r["norm_mean"]), float(r["norm_sd"]), int(r["norm_n"]))
        assert (s.norms.mean, s.norms.sd, s.norms.n) == expected
        positions = [int(p) for p in r["item_positions_reverse_keyed"].split()]
        assert s.reverse_keyed == [s.items[p - 1] for p in positions]
        assert s.domain == r["domain"] and s.name.en == r["name_en"]


def test_nf22_norms_carry_the_published_precision() -> None:
    """The NorseResearch 2019 norm table at full precision (written out here, so the test runs without
    the shared CSV); 2.1.0 rounded them, which moved z by up to 0.015."""
    new, old = load_mapping(NF22), load_mapping(NF21)
    worry, gen_func = new.scale("worry").norms, new.scale("genFunc").norms
    assert (worry.mean, worry.sd) == (5.059663360384731, 1.6237779035302427)
    assert (gen_func.mean, gen_func.sd) == (4.4861861861861865, 1.3989917825290392)
    assert (old.scale("worry").norms.mean, old.scale("worry").norms.sd) == (5.06, 1.62)
    for s in new.scales:
        assert s.norms.mean != round(s.norms.mean, 2) and s.norms.sd != round(s.norms.sd, 2), s.code
        assert (round(s.norms.mean, 2), round(s.norms.sd, 2)) == (
            old.scale(s.code).norms.mean,
            old.scale(s.code).norms.sd,
        )


def test_nf22_mapping_has_the_published_preference_and_alliance_constructs() -> None:
    m = load_mapping(NF22)
    assert m.version == "2.2.0"
    assert [(p.link_id, p.construct_code) for p in m.preferences] == [
        ("pref-techniques", "techniques"),
        ("pref-style", "style"),
        ("pref-feelings", "feelings"),
        ("pref-thoughts", "thoughts"),
        ("pref-relationship", "relationship"),
    ]
    assert {d.code: d.items for d in m.alliance.dimensions} == {
        "goal": ["alliance-goal-understand"],
        "bond": ["alliance-bond-1", "alliance-bond-accepted"],
        "task": ["alliance-task-know"],
    }
    assert m.alliance.max_raw == 28
    old = load_mapping(NF21)
    assert "pref-feelings-thoughts" in {p.link_id for p in old.preferences}
    assert old.alliance.items == ["alliance-goal", "alliance-bond-1", "alliance-bond-2", "alliance-task"]


def test_a_zero_sd_names_file_and_field(tmp_path: Path) -> None:
    path = _broken(tmp_path, lambda d: d["scales"][3]["norms"].update(sd=0))
    with pytest.raises(ContentError) as exc:
        load_mapping(path)
    assert "mappings/nf21-2.1.0.yaml: scales[3].norms.sd: must be > 0" in str(exc.value)


def test_a_threshold_of_9_names_file_and_field(tmp_path: Path) -> None:
    path = _broken(tmp_path, lambda d: d["scales"][0].update(open_if_trigger_gt=9))
    with pytest.raises(ContentError) as exc:
        load_mapping(path)
    assert "mappings/nf21-2.1.0.yaml: scales[0].open_if_trigger_gt: must be within 1-7" in str(exc.value)


def test_a_trigger_outside_its_scale_is_refused(tmp_path: Path) -> None:
    path = _broken(tmp_path, lambda d: d["scales"][0].update(trigger="worry-1"))
    with pytest.raises(ContentError) as exc:
        load_mapping(path)
    assert "scales[0].trigger: 'worry-1' is not one of the scale's items" in str(exc.value)


def test_reverse_keyed_must_be_items_of_the_scale(tmp_path: Path) -> None:
    path = _broken(tmp_path, lambda d: d["scales"][1].update(reverse_keyed=["sad-2"]))
    with pytest.raises(ContentError) as exc:
        load_mapping(path)
    assert "scales[1].reverse_keyed[0]: 'sad-2' is not one of the scale's items" in str(exc.value)


def test_a_linkid_in_two_scales_is_refused(tmp_path: Path) -> None:
    path = _broken(tmp_path, lambda d: d["scales"][1]["items"].append("sad-2"))
    with pytest.raises(ContentError) as exc:
        load_mapping(path)
    assert "linkId 'sad-2' is used twice" in str(exc.value)


def test_a_missing_field_is_named(tmp_path: Path) -> None:
    path = _broken(tmp_path, lambda d: d["scales"][2].pop("norms"))
    with pytest.raises(ContentError) as exc:
        load_mapping(path)
    assert "scales[2].norms: Field required" in str(exc.value)


@pytest.mark.parametrize("name", ["phq9-1.0.0.yaml", "gad7-1.0.0.yaml"])
def test_sum_score_mappings_load(name: str) -> None:
    path = ROOT / "mappings" / name
    if not path.exists():
        pytest.skip(f"{name} is not written yet")
    m = load_any_mapping(path)
    assert isinstance(m, SumScoreMapping)
    assert m.total.min == 0 and len(m.total.items) in (7, 9)


def test_load_any_mapping_detects_the_instrument_shape() -> None:
    assert isinstance(load_any_mapping(NF21), InstrumentMapping)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["change"].update(critical=0), "change.critical"),
        (lambda d: d["change"].update(stagnation_window=1), "change.stagnation_window"),
        (lambda d: d["alerts"].update(alliance_floor_percent=120), "alerts.alliance_floor_percent"),
        (lambda d: d["alerts"].update(suicide_scale="nope"), "alerts.suicide_scale"),
        (lambda d: d["alliance"]["change"].update(sd=0), "alliance.change.sd"),
    ],
)
def test_change_and_alert_settings_are_checked(tmp_path: Path, change: Any, field: str) -> None:
    path = _broken(tmp_path, change)
    with pytest.raises(ContentError) as exc:
        load_mapping(path)
    assert f"mappings/nf21-2.1.0.yaml: {field}:" in str(exc.value)


def test_change_and_alert_settings_are_read() -> None:
    m = load_mapping(NF21)
    assert (m.change.critical, m.change.stagnation_window) == (1.96, 4)
    assert m.alerts is not None and m.alerts.suicide_scale == "suicide"
    assert m.alliance.change is not None and m.alliance.change.reliability.assumed
