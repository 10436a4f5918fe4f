"""Which mapping scores which Questionnaire ``url|version`` (``fhir_norse.instruments.registry``)."""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from fhir_norse.instruments.registry import Instrument, InstrumentRegistry, version_key
from fhir_norse.instruments.schema import ContentError, load_any_mapping

ROOT = Path(__file__).resolve().parents[2]
STATIC = "http://fhir-norse.org/fhir/Questionnaire/nf21-static"
ADAPTIVE = "http://fhir-norse.org/fhir/Questionnaire/nf21-adaptive"
PHQ9 = "http://fhir-norse.org/fhir/Questionnaire/phq9"


@cache
def _nf21_source() -> str:
    return (ROOT / "mappings" / "nf21-2.1.0.yaml").read_text(encoding="utf-8")


def write_nf21(root: Path, version: str, pin: str | None = None, name: str | None = None) -> Path:
    """A copy of the NF 2.1 mapping as ``version``, its Questionnaires pinned to ``pin`` if given."""
    content: dict[str, Any] = yaml.load(_nf21_source(), Loader=yaml.CSafeLoader)
    content["version"] = version
    if pin is not None:
        content["questionnaires"] = {"adaptive": f"{ADAPTIVE}|{pin}", "static": f"{STATIC}|{pin}"}
    folder = root / "mappings"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"nf21-{version}.yaml")
    path.write_text(yaml.dump(content, Dumper=yaml.CSafeDumper, sort_keys=False), encoding="utf-8")
    return path


def registry(root: Path) -> InstrumentRegistry:
    return InstrumentRegistry.from_content_dir(root)


def chosen_version(reg: InstrumentRegistry, url: str, version: str | None) -> str | None:
    found = reg.for_questionnaire(url, version)
    return None if found is None else found.version


def test_a_bare_url_scores_the_questionnaire_of_the_mapping_version(tmp_path: Path) -> None:
    path = write_nf21(tmp_path, "2.1.0")
    reg = registry(tmp_path)
    assert len(reg) == 1
    for url in (STATIC, ADAPTIVE):
        found = reg.for_questionnaire(url, "2.1.0")
        assert found is not None
        assert (found.code, found.version, found.path, found.is_multiscale) == ("nf21", "2.1.0", path, True)
        assert reg.for_questionnaire(url, "2.1.1") is None
    assert sorted(next(iter(reg)).questionnaires()) == [(ADAPTIVE, "2.1.0"), (STATIC, "2.1.0")]


def test_a_pinned_mapping_scores_the_pinned_questionnaire_version(tmp_path: Path) -> None:
    write_nf21(tmp_path, "2.1.0")
    write_nf21(tmp_path, "2.1.1", pin="2.1.0")
    reg = registry(tmp_path)
    assert chosen_version(reg, STATIC, "2.1.0") == "2.1.1"
    assert chosen_version(reg, ADAPTIVE, "2.1.0") == "2.1.1"
    # Pinned to 2.1.0, it does not claim a Questionnaire 2.1.1.
    assert reg.for_questionnaire(STATIC, "2.1.1") is None


def test_the_highest_mapping_version_wins_whatever_the_file_order(tmp_path: Path) -> None:
    # File names sort the other way round from the versions.
    write_nf21(tmp_path, "2.1.10", pin="2.1.0", name="a.yaml")
    write_nf21(tmp_path, "2.1.9", pin="2.1.0", name="b.yaml")
    write_nf21(tmp_path, "2.1.0", name="c.yaml")
    reg = registry(tmp_path)
    assert chosen_version(reg, STATIC, "2.1.0") == "2.1.10"
    assert sorted(i.version for i in reg) == ["2.1.0", "2.1.10", "2.1.9"]


def test_a_new_questionnaire_version_gets_its_own_mapping(tmp_path: Path) -> None:
    write_nf21(tmp_path, "2.1.0")
    write_nf21(tmp_path, "2.1.5", pin="2.1.0")
    write_nf21(tmp_path, "2.2.0")  # bare url: scores Questionnaire 2.2.0 only
    reg = registry(tmp_path)
    assert chosen_version(reg, STATIC, "2.1.0") == "2.1.5"
    assert chosen_version(reg, STATIC, "2.2.0") == "2.2.0"


def test_a_sum_score_mapping_is_found_by_its_questionnaire(tmp_path: Path) -> None:
    (tmp_path / "mappings").mkdir()
    shutil.copy(ROOT / "mappings" / "phq9-1.0.0.yaml", tmp_path / "mappings")
    write_nf21(tmp_path, "2.1.0")
    reg = registry(tmp_path)
    found = reg.for_questionnaire(PHQ9, "1.0.0")
    assert found is not None
    assert (found.code, found.is_multiscale) == ("phq9", False)
    assert reg.scores_url(PHQ9) and reg.scores_url(STATIC)


def test_unknown_questionnaires_are_not_scored(tmp_path: Path) -> None:
    write_nf21(tmp_path, "2.1.0")
    reg = registry(tmp_path)
    assert reg.for_questionnaire("http://example.org/Questionnaire/other", "2.1.0") is None
    assert reg.for_questionnaire(STATIC, None) is None
    assert not reg.scores_url("http://example.org/Questionnaire/other")


def test_the_same_instrument_version_twice_is_refused(tmp_path: Path) -> None:
    write_nf21(tmp_path, "2.1.1", pin="2.1.0", name="nf21-2.1.1.yaml")
    write_nf21(tmp_path, "2.1.1", pin="2.1.0", name="nf21-local.yaml")
    with pytest.raises(ContentError) as raised:
        registry(tmp_path)
    assert raised.value.file.endswith("nf21-local.yaml")
    assert "nf21 2.1.1 is also defined in nf21-2.1.1.yaml" in str(raised.value)


def test_a_broken_mapping_is_a_content_error(tmp_path: Path) -> None:
    path = write_nf21(tmp_path, "2.1.0")
    path.write_text(path.read_text(encoding="utf-8").replace("version: 2.1.0", "version: two", 1))
    with pytest.raises(ContentError):
        registry(tmp_path)


def test_no_mappings_folder_is_an_empty_registry(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    assert len(reg) == 0
    assert reg.for_questionnaire(STATIC, "2.1.0") is None


def test_the_constructor_takes_loaded_instruments(tmp_path: Path) -> None:
    low, high = write_nf21(tmp_path, "2.1.0"), write_nf21(tmp_path, "2.1.3", pin="2.1.0")
    reg = InstrumentRegistry([Instrument(load_any_mapping(p), p) for p in (high, low)])
    assert chosen_version(reg, ADAPTIVE, "2.1.0") == "2.1.3"


def test_version_key_orders_numerically() -> None:
    assert version_key("2.10.0") > version_key("2.9.0")
    assert version_key("2.1.10") > version_key("2.1.9")
    assert version_key("10.0.0") > version_key("9.99.99")
    versions = ["2.10.0", "2.1.0", "2.9.0", "2.1.1", "1.0.0"]
    assert sorted(versions, key=version_key) == ["1.0.0", "2.1.0", "2.1.1", "2.9.0", "2.10.0"]
    assert version_key("2.1.0") == version_key("2.1.0")
