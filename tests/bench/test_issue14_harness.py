"""The issue-14 benchmark harness (bench/issue14.py, bench/wrk/*.lua): its plumbing, not the figures.

wrk runs against ``python -m http.server`` (GET of files that exist answers 200, of files that do not
404, POST 501), so the scripts' JSON, their error counts and the soak's per-kind counters are checked
against answers known in advance. Skipped where wrk is not installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench import common, issue14

needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")


@pytest.fixture
def static_server(tmp_path: Path) -> Iterator[issue14.Server]:
    root = tmp_path / "www"
    (root / "fhir" / "Observation").mkdir(parents=True)
    for name in ("a", "b"):
        (root / "fhir" / "Observation" / name).write_text('{"resourceType": "Observation"}')
    port = issue14.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = issue14.Server("static", "static", proc, port, tmp_path / "static.log")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{server.root}/fhir/Observation/a", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    try:
        yield server
    finally:
        server.stop()


def _lines(tmp_path: Path, name: str, lines: list[str]) -> str:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@needs_wrk
def test_get_script_reports_wrk_histogram_as_json(static_server: issue14.Server, tmp_path: Path) -> None:
    paths = _lines(tmp_path, "ok.txt", ["/fhir/Observation/a", "/fhir/Observation/b"])
    run = issue14.wrk(static_server, "get.lua", [paths], connections=2, seconds=1)
    assert run["requests"] > 0
    assert run["error_count"] == 0
    assert run["connections"] == 2
    assert 0 < run["p50"] <= run["p90"] <= run["p99"] <= run["max"]
    assert run["rps"] == pytest.approx(run["requests"] / run["seconds"], rel=1e-3)


@needs_wrk
def test_get_script_counts_error_answers(static_server: issue14.Server, tmp_path: Path) -> None:
    paths = _lines(tmp_path, "missing.txt", ["/fhir/Observation/missing"])
    run = issue14.wrk(static_server, "get.lua", [paths], connections=1, seconds=1)
    assert run["requests"] > 0
    # Every answer was a 404: wrk counts each as a status error.
    assert run["errors"]["status"] == run["requests"]


@needs_wrk
def test_soak_script_counts_each_kind_and_bad_answers(static_server: issue14.Server, tmp_path: Path) -> None:
    reads = _lines(tmp_path, "reads.txt", ["/fhir/Observation/a"])
    searches = _lines(tmp_path, "searches.txt", ["/fhir/Observation/b"])
    creates = _lines(tmp_path, "creates.txt", ['{"resourceType": "Observation"}'])
    responses = _lines(tmp_path, "responses.txt", ['{"resourceType": "QuestionnaireResponse"}'])
    # Only reads and creates: the reads answer 200, the creates (POST) 501 from http.server.
    args = [reads, searches, creates, responses, "1", "0", "1", "0", "1"]
    run = issue14.wrk(static_server, "soak.lua", args, connections=1, seconds=1)
    counts = run["counts"]
    assert counts["sent_search"] == 0 and counts["sent_response"] == 0
    assert counts["sent_read"] > 0 and counts["sent_create"] > 0
    assert counts["sent_read"] + counts["sent_create"] >= run["requests"]
    assert counts["bad"] == run["errors"]["status"] > 0


def test_tree_pids_and_rss_cover_the_workers(tmp_path: Path) -> None:
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(tmp_path / 'child')!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        marker = tmp_path / "child"
        deadline = time.monotonic() + 30
        while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(marker.read_text())
        pids = issue14.tree_pids(parent.pid)
        assert parent.pid in pids and child in pids
        assert issue14.rss_mb(parent.pid) > issue14.rss_mb(child) > 0
    finally:
        for pid in issue14.tree_pids(parent.pid)[1:]:
            subprocess.run(["kill", str(pid)], check=False)
        parent.kill()
        parent.wait()


def test_splice_replaces_only_the_issue14_section() -> None:
    old = "# Benchmarks (issues 2, 3 and 5)\n\nolder figures\n"
    first = issue14.splice(old, f"{issue14.START_MARK}\nrun one\n{issue14.END_MARK}\n")
    assert first.startswith(issue14.START_MARK) and first.endswith(old)
    second = issue14.splice(first, f"{issue14.START_MARK}\nrun two\n{issue14.END_MARK}\n")
    assert "run two" in second and "run one" not in second
    assert second.count(issue14.START_MARK) == 1 and second.endswith(old)


def _result(rps: float, p50: float, p99: float) -> dict[str, Any]:
    return {"rounds": [], "rps": rps, "p50": p50, "p99": p99, "errors": 0}


def test_report_gives_ratios_to_sekmet_and_verdicts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    servers = {
        "norse-sqlite": {"label": "fhir-norse SQLite", "workers": 2},
        "sekmet": {"label": "sekmet-fhir", "workers": 1},
        "medplum": {"label": "Medplum fhir-router (in memory)", "workers": 1},
    }
    common.write_json(
        "issue14-t-run.json",
        {"servers": servers, "dataset": {"patients": 10, "per_patient": 2}, "options": {"seconds": 1}},
    )
    common.write_json(
        "issue14-t-rounds.json",
        {
            "read-16": {"norse-sqlite": _result(3000.0, 4.0, 15.0), "sekmet": _result(1000.0, 15.0, 50.0)},
            "search-16": {
                "norse-sqlite": _result(2000.0, 6.0, 25.0),
                "medplum": {"rounds": [], "probe": {"seconds": None, "over_s": 30.0}},
            },
        },
    )
    common.write_json("issue14-t-ingest-sqlite.json", {"rps": 120.0, "p99": 140.0, "error_count": 0})
    text = issue14.markdown("t")
    assert "| read by id, 16 clients, >= 3x sekmet-fhir's reads | 3.00x: met |" in text
    assert "| hot search, 16 clients, >= 3x sekmet-fhir's reads | 2.00x: **not met** |" in text
    assert "| hot search, 16 clients, p99 <= 20 ms | 25 ms: **not met** |" in text
    assert "over 30 s a query (one probe)" in text
    assert "120.0/s, p99 140 ms: met" in text
    assert json.loads((tmp_path / "issue14-t-run.json").read_text())["servers"] == servers
