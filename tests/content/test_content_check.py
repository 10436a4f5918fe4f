"""``python -m tools.content_check`` passes on the real tree and names precisely what is wrong in a copy."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tools.content_check import check_content, main

ROOT = Path(__file__).resolve().parents[2]
STATIC = "questionnaires/nf21/Questionnaire-nf21-static.json"
NF21 = "mappings/nf21-2.1.0.yaml"
NF22 = "mappings/nf21-2.2.0.yaml"
STATIC_22 = "questionnaires/nf21/Questionnaire-nf21-static-2.2.0.json"


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    for folder in ("questionnaires", "profiles", "mappings"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    return tmp_path


def _edit_json(root: Path, rel: str, change: Callable[[dict[str, Any]], None]) -> None:
    path = root / rel
    body = json.loads(path.read_text(encoding="utf-8"))
    change(body)
    path.write_text(json.dumps(body, ensure_ascii=False, indent=2), encoding="utf-8")


def _edit_yaml(root: Path, rel: str, change: Callable[[dict[str, Any]], None]) -> None:
    path = root / rel
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _item(body: dict[str, Any], link_id: str) -> dict[str, Any]:
    stack = list(body["item"])
    while stack:
        item = stack.pop()
        if item["linkId"] == link_id:
            found: dict[str, Any] = item
            return found
        stack += item.get("item", [])
    raise KeyError(link_id)


def _messages(root: Path) -> list[str]:
    return [str(p) for p in check_content(root)]


def test_content_check_passes_on_the_real_tree(capsys: pytest.CaptureFixture[str]) -> None:
    assert [str(p) for p in check_content(ROOT)] == []
    assert main(ROOT) == 0
    assert "OK" in capsys.readouterr().out


def test_content_check_passes_on_an_unchanged_copy(copy: Path) -> None:
    assert _messages(copy) == []


def test_content_check_finds_a_missing_translation(copy: Path) -> None:
    _edit_json(copy, STATIC, lambda q: _item(q, "sad-2").pop("_text"))
    assert _messages(copy) == [f"{STATIC}: item[sad-2].text: has no English translation"]


def test_content_check_finds_a_missing_answer_translation(copy: Path) -> None:
    _edit_json(copy, STATIC, lambda q: _item(q, "worry-2")["answerOption"][0]["valueCoding"].pop("_display"))
    assert _messages(copy) == [f"{STATIC}: item[worry-2].answerOption[0].display: has no English translation"]


def test_content_check_finds_a_duplicate_link_id(copy: Path) -> None:
    _edit_json(copy, STATIC, lambda q: _item(q, "sad-3").update(linkId="sad-2"))
    messages = _messages(copy)
    assert f"{STATIC}: item[sad-2]: que-2: linkId 'sad-2' is not unique" in messages


def test_content_check_finds_a_threshold_of_9(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edit_yaml(copy, NF21, lambda d: d["scales"][0].update(open_if_trigger_gt=9))
    assert _messages(copy) == [f"{NF21}: scales[0].open_if_trigger_gt: must be within 1-7 (got 9)"]
    assert main(copy) == 1
    assert "scales[0].open_if_trigger_gt" in capsys.readouterr().out


def test_content_check_finds_an_enable_when_to_an_unknown_item(copy: Path) -> None:
    _edit_json(copy, STATIC, lambda q: _item(q, "group-sad")["enableWhen"][0].update(question="nope-1"))
    messages = _messages(copy)
    assert (
        f"{STATIC}: item[group-sad].enableWhen[0]: question 'nope-1' is not an item of this Questionnaire"
        in (messages)
    )


def test_content_check_finds_a_zero_sd(copy: Path) -> None:
    _edit_yaml(copy, NF21, lambda d: d["scales"][3]["norms"].update(sd=0))
    assert _messages(copy) == [f"{NF21}: scales[3].norms.sd: must be > 0"]


def test_content_check_finds_a_gate_that_no_longer_matches_the_threshold(copy: Path) -> None:
    _edit_yaml(copy, NF21, lambda d: d["scales"][0].update(open_if_trigger_gt=3.5))
    messages = _messages(copy)
    assert len(messages) == 2  # sad-2 and sad-3 share the group's gate
    assert all("item[group-sad].enableWhen: must open sad when sad-1 is one of" in m for m in messages)


def test_content_check_finds_a_version_mismatch(copy: Path) -> None:
    _edit_json(copy, STATIC, lambda q: q.update(version="2.3.0"))
    url = "http://fhir-norse.org/fhir/Questionnaire/nf21-static"
    versions = "['2.2.0', '2.3.0']"
    assert (
        f"{NF21}: questionnaires.static: version 2.1.0 but the pack has {url} in version(s) {versions}"
        in (_messages(copy))
    )


def test_content_check_checks_every_version_of_a_form(copy: Path) -> None:
    """2.1.0 and 2.2.0 of one form are both published; each is checked against its own mapping, and one
    ``url|version`` in two files is refused."""
    _edit_yaml(copy, NF22, lambda d: d["preferences"].append({"link_id": "pref-extra", "construct": "x"}))
    shutil.copy(copy / STATIC, copy / "questionnaires/nf21/Questionnaire-copy.json")
    messages = _messages(copy)
    assert f"{NF22}: pref-extra: has no item in {STATIC_22}" in messages
    assert not any(m.startswith(f"{NF21}:") for m in messages)
    assert (
        "questionnaires/nf21/Questionnaire-nf21-static.json: url: "
        "http://fhir-norse.org/fhir/Questionnaire/nf21-static|2.1.0 is also used by "
        "questionnaires/nf21/Questionnaire-copy.json" in messages
    )


def test_content_check_finds_an_item_in_no_scale(copy: Path) -> None:
    def add(q: dict[str, Any]) -> None:
        extra = json.loads(json.dumps(_item(q, "single-sleep")))
        extra["linkId"] = "single-extra"
        _item(q, "group-single")["item"].append(extra)

    _edit_json(copy, STATIC, add)
    assert f"{STATIC}: item[single-extra]: is in no scale or group of {NF21}" in _messages(copy)


def test_content_check_finds_an_answer_code_outside_its_code_system(copy: Path) -> None:
    _edit_json(copy, STATIC, lambda q: _item(q, "cog-2")["answerOption"][0]["valueCoding"].update(code="8"))
    messages = _messages(copy)
    assert any(
        m.startswith(f"{STATIC}: item[cog-2].answerOption[0]: code '8' is not in CodeSystem")
        for m in messages
    )


def test_content_check_finds_invalid_r4(copy: Path) -> None:
    _edit_json(copy, STATIC, lambda q: q.update(status="published"))
    assert any(m.startswith(f"{STATIC}: ") and "not valid R4" in m for m in _messages(copy))


def test_content_check_finds_que_invariants(copy: Path) -> None:
    def breaks(q: dict[str, Any]) -> None:
        _item(q, "group-single")["item"].append(
            {
                "linkId": "note",
                "type": "display",
                "text": "x",
                "required": True,
                "_text": _item(q, "single-sleep")["_text"],
            }
        )
        _item(q, "group-medication")["item"].append(
            {"linkId": "empty", "type": "group", "text": "x", "_text": _item(q, "single-sleep")["_text"]}
        )

    _edit_json(copy, STATIC, breaks)
    messages = _messages(copy)
    assert f"{STATIC}: item[note]: que-6: required and repeats are not permitted on display items" in messages
    assert f"{STATIC}: item[empty]: que-1: a group must have nested items" in messages
