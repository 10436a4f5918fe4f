"""Issue 14's benchmark: fhir-norse (SQLite, PostgreSQL) against sekmet-fhir and Medplum's fhir-router.

    python -m bench.run_all --issue14 [--scale small|issue|full] [--only read,search,...]
                            [--seconds 20] [--soak-seconds 600] [--plan-responses 10000]

Everything is driven from outside the servers: ``fhir-norse serve`` (``--workers`` when the option
exists), its ``token`` command, its HTTP API, and ``bench.load``'s bulk loader for the dataset. The
load generator is wrk (``bench/wrk/*.lua``; latency percentiles from wrk's own histogram, printed by
the scripts' ``done()`` hook as JSON). The competitors are started here: sekmet-fhir from PyPI in a
venv of its own (``var/bench/sekmet-venv``) and Medplum's fhir-router over its in-memory repository
behind ``bench/medplum/server.mjs`` (where ``node`` and ``npm`` are present). Both get the ``issue``
dataset (2,000 Patients x 50 Observations, same ids: PUT by id in batch Bundles).

Measures (``--only`` picks some; each writes ``bench/results/issue14-<scale>-<measure>.json``):

- ``read``: read by id at 1 and 16 clients; ``search``: the hot search at 16; ``create``: POST
  Observation at 16. Each ``--seconds`` long, two rounds in opposite order, every server.
- ``transaction``: 100-entry transaction Bundles, sequential (p50 / max).
- ``ingest``: full-length NF 2.1 responses with scoring at 8 clients (req/s, p99), and the database
  bytes per stored response (size before and after, / responses stored).
- ``next_question``: ``$next-question`` p99 (``bench.adaptive_bench``'s sessions).
- ``soak``: 20 clients, reads/searches/creates/scored responses for ``--soak-seconds``; errors and the
  server's RSS (parent + workers) every 10 s.
- ``plan``: PostgreSQL with autovacuum off per table: ingest rate after 100 and after
  ``--plan-responses`` responses.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import sqlalchemy as sa

from bench import common, dataset

FHIR_JSON = "application/fhir+json"
WORK = common.ROOT / "var" / "bench" / "issue14"
WRK_DIR = Path(__file__).resolve().parent / "wrk"
MEDPLUM_DIR = Path(__file__).resolve().parent / "medplum"
SEKMET_VENV = common.ROOT / "var" / "bench" / "sekmet-venv"
SEKMET_DATA = common.ROOT / "var" / "bench" / "sekmet"
PLAN_SCHEMA = "bench_plan14"

SCALES: dict[str, tuple[int, int]] = {"small": (200, 10), "issue": (2000, 50), "full": (10_000, 100)}
MEASURES = ("read", "search", "create", "transaction", "ingest", "raw", "next_question", "soak", "plan")
COMPETITOR_SCALE = "issue"

# Issue 14's targets.
TARGETS = {
    "ratio_to_sekmet_read": 3.0,
    "p99_16_ms": 20.0,
    "read1_p50_ms": 1.5,
    "create_per_s": 800.0,
    "transaction_ms": 100.0,
    "ingest_per_s": 100.0,
    "ingest_p99_ms": 150.0,
    "next_question_p99_ms": 15.0,
    "search_over_raw": 3.0,
    "soak_p99_ms": 100.0,
    "bytes_per_response": 275_000.0,
    "plan_ratio": 0.8,
}


@dataclass
class Options:
    scale: str = "small"
    only: tuple[str, ...] = MEASURES
    seconds: int = 20
    soak_seconds: int = 600
    plan_responses: int = 10_000
    competitors: tuple[str, ...] = ("sekmet", "medplum")
    databases: tuple[str, ...] = ("sqlite", "postgresql")
    skip_load: bool = False
    search_probe_s: float = 30.0
    competitor_scale: str = COMPETITOR_SCALE


def log(message: str) -> None:
    common.log(f"[issue14] {message}")


# ------------------------------------------------------------------------------------------ tools
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_wrk() -> str:
    """wrk's path; installs the Debian package when missing and possible, else says how."""
    found = shutil.which("wrk")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        log("wrk is missing: apt-get install -y wrk")
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=False, capture_output=True)
        found = shutil.which("wrk")
        if found:
            return found
    raise SystemExit(
        "bench: wrk is needed (https://github.com/wg/wrk). Install it with `sudo apt-get install -y wrk` "
        "(Debian/Ubuntu), `brew install wrk` (macOS), or build it from source and put it on PATH."
    )


def tool_version(cmd: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].strip() if text else None


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_mb(root: int) -> float:
    total = 0
    for pid in tree_pids(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


# ---------------------------------------------------------------------------------------- servers
@dataclass
class Server:
    """A server process of any kind, its FHIR base and the headers a request needs."""

    name: str
    label: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    headers: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    _log: Any = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base(self) -> str:
        return f"{self.root}/fhir"

    def client(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.root, headers=self.headers, timeout=timeout)

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()


def _spawn(
    name: str, label: str, cmd: list[str], env: dict[str, str], cwd: Path, port: int, ready: str
) -> Server:
    WORK.mkdir(parents=True, exist_ok=True)
    log_path = WORK / f"{name}.log"
    log_file = log_path.open("w")
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(name, label, proc, port, log_path, _log=log_file)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            server.stop()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{label} exited with {proc.returncode}; {log_path}:\n{tail}")
        try:
            if httpx.get(f"{server.root}{ready}", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"{label} did not start within 300 s; see {log_path}")


def norse_workers_option() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "fhir_norse.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=common.ROOT,
        check=False,
    )
    return "--workers" in out.stdout


def start_norse(kind: str, url: str, name: str | None = None) -> Server:
    port = free_port()
    env = dict(
        os.environ,
        FHIR_NORSE_LOG_LEVEL="WARNING",
        FHIR_NORSE_MODE="development",
        FHIR_NORSE_PORT=str(port),
        FHIR_NORSE_DATABASE_URL=url,
    )
    cmd = [sys.executable, "-m", "fhir_norse.cli", "serve", "--database-url", url, "--port", str(port)]
    workers: int | str = 1
    if norse_workers_option():
        workers = os.cpu_count() or 1  # the option's default (all cores), recorded
    label = f"fhir-norse {'SQLite' if kind == 'sqlite' else 'PostgreSQL'}"
    server = _spawn(name or f"norse-{kind}", label, cmd, env, common.ROOT, port, "/health")
    minted = subprocess.run(
        [sys.executable, "-m", "fhir_norse.cli", "token", "--scope", "system/*.cruds", "--ttl", "86400"],
        capture_output=True,
        text=True,
        env=env,
        cwd=common.ROOT,
        check=False,
    )
    if minted.returncode != 0:
        server.stop()
        raise RuntimeError(f"fhir-norse token failed: {minted.stderr[-1000:]}")
    token = minted.stdout.strip().splitlines()[-1]
    server.headers = {"Authorization": f"Bearer {token}", "Accept": FHIR_JSON}
    server.info = {"workers": workers, "database": kind}
    return server


def ensure_sekmet() -> Path:
    exe = SEKMET_VENV / "bin" / "sekmet"
    if not exe.exists():
        log(f"installing sekmet-fhir into {SEKMET_VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(SEKMET_VENV)], check=True)
        subprocess.run(
            [str(SEKMET_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "sekmet-fhir"],
            check=True,
        )
    return exe


def sekmet_version() -> str | None:
    py = SEKMET_VENV / "bin" / "python"
    if not py.exists():
        return None
    out = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('sekmet-fhir'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or None


def start_sekmet() -> Server:
    """sekmet-fhir with its defaults (auth ``none``, strict inbound validation, SQLite), except the two
    settings its documentation names for load runs: no inbound traffic log, no workflow simulator."""
    exe = ensure_sekmet()
    port = free_port()
    shutil.rmtree(SEKMET_DATA, ignore_errors=True)
    SEKMET_DATA.mkdir(parents=True)
    settings = SEKMET_DATA / "settings.yaml"
    settings.write_text(
        f"base_url: http://127.0.0.1:{port}/fhir\nhost: 127.0.0.1\nport: {port}\n"
        f"data_dir: {SEKMET_DATA}\nlog_inbound: false\nsimulator:\n  enabled: false\n",
        encoding="utf-8",
    )
    env = dict(os.environ, SEKMET_CONFIG=str(settings))
    server = _spawn(
        "sekmet",
        "sekmet-fhir",
        [str(exe), "serve", "--config", str(settings)],
        env,
        SEKMET_DATA,
        port,
        "/fhir/metadata",
    )
    server.headers = {"Accept": FHIR_JSON}
    server.info = {"version": sekmet_version(), "workers": 1, "settings": settings.read_text()}
    return server


def medplum_versions() -> dict[str, str]:
    out = {}
    for pkg in ("core", "definitions", "fhir-router"):
        path = MEDPLUM_DIR / "node_modules" / "@medplum" / pkg / "package.json"
        if path.exists():
            out[f"@medplum/{pkg}"] = json.loads(path.read_text())["version"]
    return out


def start_medplum() -> Server:
    if not shutil.which("node") or not shutil.which("npm"):
        raise RuntimeError("node and npm are not installed: Medplum's fhir-router is left out")
    if not (MEDPLUM_DIR / "node_modules" / "@medplum" / "fhir-router").exists():
        # package-lock.json pins the whole tree: npm ci installs exactly that (node_modules is git-ignored).
        log("npm ci in bench/medplum")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=MEDPLUM_DIR, check=True)
    port = free_port()
    server = _spawn(
        "medplum",
        "Medplum fhir-router (in memory)",
        ["node", "server.mjs", "--port", str(port)],
        dict(os.environ),
        MEDPLUM_DIR,
        port,
        "/health",
    )
    server.headers = {"Accept": FHIR_JSON}
    server.info = {"node": tool_version(["node", "--version"]), **medplum_versions(), "workers": 1}
    return server


# ------------------------------------------------------------------------------------------ data
def load_norse(kind: str, patients: int, per_patient: int, label: str) -> dict[str, Any]:
    """``bench.load`` (the project's own storage functions, bulk mode) into the benchmark database."""
    out = f"issue14-{label}-load-{kind}.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.load",
        kind,
        "--patients",
        str(patients),
        "--per-patient",
        str(per_patient),
        "--mode",
        "bulk",
        "--out",
        out,
    ]
    rc = subprocess.call(cmd, cwd=common.ROOT)
    if rc != 0:
        raise RuntimeError(f"bench.load {kind} failed ({rc})")
    return dict(json.loads((common.RESULTS / out).read_text()))


def load_via_api(server: Server, patients: int, per_patient: int, batch: int = 250) -> dict[str, Any]:
    """The same dataset through the FHIR API: batch Bundles of PUT-by-id entries (same ids), two
    concurrent senders."""
    t0 = time.perf_counter()
    failures: list[str] = []

    def bundles() -> Iterator[bytes]:
        entries: list[dict[str, Any]] = []
        for res_type, res_id, body in dataset.generate(patients, per_patient):
            entries.append(
                {
                    "resource": {**body, "id": res_id},
                    "request": {"method": "PUT", "url": f"{res_type}/{res_id}"},
                }
            )
            if len(entries) >= batch:
                yield orjson.dumps({"resourceType": "Bundle", "type": "batch", "entry": entries})
                entries = []
        if entries:
            yield orjson.dumps({"resourceType": "Bundle", "type": "batch", "entry": entries})

    lock = threading.Lock()
    source = bundles()

    def sender() -> int:
        sent = 0
        with server.client(timeout=600) as client:
            while True:
                with lock:
                    body = next(source, None)
                if body is None:
                    return sent
                answer = client.post("/fhir", content=body, headers={"Content-Type": FHIR_JSON})
                if answer.status_code != 200:
                    failures.append(f"{answer.status_code} {answer.text[:300]}")
                    return sent
                for entry in answer.json().get("entry", []):
                    status = str(entry.get("response", {}).get("status", ""))
                    if not status.startswith(("200", "201")):
                        failures.append(f"entry {status}: {json.dumps(entry)[:300]}")
                        return sent
                sent += 1

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bundles_sent = sum(pool.map(lambda _: sender(), range(2)))
    if failures:
        raise RuntimeError(f"loading {server.label}: {failures[0]}")
    # The last resource is there under its own id.
    last = dataset.observation_id(patients - 1, per_patient - 1)
    with server.client() as client:
        check = client.get(f"/fhir/Observation/{last}")
    if check.status_code != 200:
        raise RuntimeError(f"loading {server.label}: Observation/{last} answered {check.status_code}")
    seconds = time.perf_counter() - t0
    total = patients * (1 + per_patient)
    return {"resources": total, "bundles": bundles_sent, "seconds": seconds, "rate_per_s": total / seconds}


def write_lines(name: str, lines: Iterator[str] | Sequence[str]) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / name
    with path.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    return path


def request_files(patients: int, per_patient: int, tag: str) -> dict[str, Path]:
    """Files of read paths, hot-search paths and Observation bodies over this dataset."""
    rng = random.Random(14)
    n = min(20_000, patients * per_patient)
    reads = (
        f"/fhir/Observation/{dataset.observation_id(rng.randrange(patients), rng.randrange(per_patient))}"
        for _ in range(n)
    )
    searches = []
    for _ in range(min(20_000, patients * len(dataset.CODES))):
        pid = dataset.patient_id(rng.randrange(patients))
        code = rng.choice(dataset.CODES)[0]
        searches.append(
            f"/fhir/Observation?patient={pid}&code={dataset.LOINC}%7C{code}&_sort=-date&_count=20"
        )
    creates = (
        orjson.dumps(dataset.observation(dataset.patient_id(rng.randrange(patients)), rng)).decode()
        for _ in range(2000)
    )
    return {
        "read": write_lines(f"{tag}-reads.txt", reads),
        "search": write_lines(f"{tag}-searches.txt", searches),
        "create": write_lines(f"{tag}-creates.txt", creates),
    }


# ------------------------------------------------------------------------------------------- wrk
def wrk(
    server: Server,
    script: str,
    args: Sequence[str],
    connections: int,
    seconds: int,
    timeout_s: int = 30,
) -> dict[str, Any]:
    """One wrk run; the figures its script's ``done()`` printed."""
    threads = max(1, min(connections, os.cpu_count() or 1))
    cmd = [ensure_wrk(), "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s"]
    cmd += ["--timeout", f"{timeout_s}s", "-s", script]
    for key, value in server.headers.items():
        cmd += ["-H", f"{key}: {value}"]
    cmd += [server.root, "--", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=WRK_DIR, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(
            f"wrk gave no figures (rc {out.returncode}): {out.stderr[-1000:]} {out.stdout[-1000:]}"
        )
    result: dict[str, Any] = json.loads(line[len("WRKJSON ") :])
    result.update(connections=connections, threads=threads, target_seconds=seconds)
    errors = result["errors"]
    result["error_count"] = sum(errors.values())
    return result


def drain(server: Server, limit_s: float = 180) -> float:
    """Wait until the server answers a cheap request quickly again (requests a timed-out wrk left
    queued must not slow the next measurement). Returns the seconds waited."""
    t0 = time.monotonic()
    path = "/fhir/metadata" if server.name == "sekmet" else "/health"
    while time.monotonic() - t0 < limit_s:
        try:
            s = time.monotonic()
            httpx.get(server.root + path, timeout=limit_s)
            if time.monotonic() - s < 0.5:
                break
        except httpx.HTTPError:
            time.sleep(1)
    return time.monotonic() - t0


# -------------------------------------------------------------------------------- measures: rounds
# Slower than this for one query alone, and 16 clients would queue minutes of work behind the run:
# the table then gives the probe's time instead of a wrk run.
SEARCH_PROBE_LIMIT_S = 3.0

RUNS = (
    ("read", 1, "get.lua", "read"),
    ("read", 16, "get.lua", "read"),
    ("search", 1, "get.lua", "search"),
    ("search", 16, "get.lua", "search"),
    ("create", 16, "post.lua", "create"),
)


def rounds(servers: Sequence[Server], files: dict[str, dict[str, Path]], opts: Options) -> dict[str, Any]:
    """read 1 / read 16 / search 1 / search 16 / create 16 on every server, two rounds in opposite order."""
    wanted = [r for r in RUNS if r[0] in opts.only]
    plan = [(r, s) for r in wanted for s in servers]
    results: dict[str, Any] = {}
    probes: dict[str, Any] = {}
    for round_no, order in enumerate((plan, list(reversed(plan))), start=1):
        for (measure, conns, script, kind), server in order:
            key = f"{measure}-{conns}"
            slot = results.setdefault(key, {}).setdefault(server.name, {"rounds": []})
            f = files[server.name]
            if measure == "search" and server.name in ("sekmet", "medplum"):
                # A full scan can take minutes: one probe first, and no wrk run when it is that slow.
                probe = probes.get(server.name) or search_probe(server, f["search"], opts.search_probe_s)
                probes[server.name] = probe
                slot["probe"] = probe
                if probe.get("seconds") is None or probe["seconds"] > SEARCH_PROBE_LIMIT_S:
                    continue
            args = (
                [str(f[kind])] if script == "get.lua" else ["/fhir/Observation", str(f[kind]), "random", "1"]
            )
            log(f"round {round_no}: {key} on {server.label}")
            try:
                run = wrk(server, script, args, conns, opts.seconds)
            except RuntimeError as exc:
                run = {"failed": str(exc)}
            run["drain_s"] = drain(server)
            run["round"] = round_no
            slot["rounds"].append(run)
    for per_server in results.values():
        for slot in per_server.values():
            good = [r for r in slot["rounds"] if "rps" in r]
            if good:
                slot["rps"] = statistics.fmean(r["rps"] for r in good)
                slot["p50"] = statistics.fmean(r["p50"] for r in good)
                slot["p99"] = statistics.fmean(r["p99"] for r in good)
                slot["errors"] = sum(r["error_count"] for r in good)
    return results


def search_probe(server: Server, paths: Path, limit_s: float) -> dict[str, Any]:
    path = paths.read_text().splitlines()[0]
    t0 = time.perf_counter()
    try:
        answer = httpx.get(server.root + path, headers=server.headers, timeout=limit_s)
    except httpx.TimeoutException:
        waited = drain(server, limit_s=600)
        return {"seconds": None, "over_s": limit_s, "drain_s": waited}
    return {"seconds": time.perf_counter() - t0, "status": answer.status_code, "bytes": len(answer.content)}


# ---------------------------------------------------------------------------- measures: fhir-norse
def transaction(server: Server, patients: int, n: int) -> dict[str, Any]:
    from bench.http_bench import transaction_bundle

    rng = random.Random(1414)
    bodies = [orjson.dumps(transaction_bundle(rng, patients)) for _ in range(n + 2)]
    times, errors = [], []
    with server.client() as client:
        for i, body in enumerate(bodies):
            t0 = time.perf_counter()
            answer = client.post("/fhir", content=body, headers={"Content-Type": FHIR_JSON})
            dt = time.perf_counter() - t0
            if answer.status_code != 200:
                errors.append(f"{answer.status_code} {answer.text[:300]}")
            elif i >= 2:  # two warm-up Bundles
                times.append(dt)
    return {"entries": 100, **common.stats_ms(times), "errors": len(errors), "first_error": errors[:1]}


def db_bytes(kind: str, url: str, schema: str = common.PG_SCHEMA) -> int:
    if kind == "sqlite":
        path = Path(sa.engine.make_url(url).database or "")
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return sum(
            Path(f"{path}{suffix}").stat().st_size
            for suffix in ("", "-wal")
            if Path(f"{path}{suffix}").exists()
        )
    engine = sa.create_engine(common.PG_SERVER)
    try:
        with engine.connect() as conn:
            return int(
                conn.exec_driver_sql(
                    "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = %(s)s AND c.relkind = 'r'",
                    {"s": schema},
                ).scalar_one()
            )
    finally:
        engine.dispose()


def ingest_setup(server: Server, n_patients: int, n_bodies: int, tag: str, seed: int = 5) -> Path:
    """Patients (each in an EpisodeOfCare), and a file of ``n_bodies`` full-length NF 2.1 responses
    (``bench.ingest_bench``'s generator) round-robin over them, a week apart."""
    from bench import ingest_bench

    with server.client() as client:
        headers = {**server.headers, "Content-Type": FHIR_JSON}
        pids = ingest_bench.create_patients(client, headers, n_patients, tag)  # type: ignore[arg-type]
    rng = random.Random(seed)
    per_patient = math.ceil(n_bodies / n_patients)
    bodies = ingest_bench.workload(rng, pids, per_patient)[:n_bodies]
    return write_lines(f"{tag}-responses.txt", (b.decode() for _depth, b in bodies))


def ingest(server: Server, kind: str, url: str, opts: Options, tag: str) -> dict[str, Any]:
    clients = 8
    expected = max(200, int(opts.seconds * TARGETS["ingest_per_s"] * 1.5))
    t0 = time.perf_counter()
    bodies = ingest_setup(server, 100, expected, tag)
    setup_s = time.perf_counter() - t0
    before = db_bytes(kind, url)
    threads = max(1, min(clients, os.cpu_count() or 1))
    run = wrk(
        server,
        "post.lua",
        ["/fhir/QuestionnaireResponse", str(bodies), "sequential", str(threads)],
        clients,
        opts.seconds,
        60,
    )
    drain(server)
    stored = run["requests"] - run["errors"]["status"]
    after = db_bytes(kind, url)
    return {
        **run,
        "setup_s": setup_s,
        "bodies": expected,
        "wrapped": run["requests"] > expected,
        "db_bytes_before": before,
        "db_bytes_after": after,
        "stored": stored,
        "bytes_per_response": (after - before) / stored if stored > 0 else None,
    }


def soak(server: Server, files: dict[str, Path], responses: Path, seconds: int) -> dict[str, Any]:
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sampler() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - t0, server.rss_mb()))
            stop.wait(10)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    conns = 20
    threads = max(1, min(conns, os.cpu_count() or 1))
    args = [
        str(files["read"]),
        str(files["search"]),
        str(files["create"]),
        str(responses),
        "50",
        "30",
        "15",
        "5",
        str(threads),
    ]
    try:
        run = wrk(server, "soak.lua", args, conns, seconds, 60)
    finally:
        stop.set()
        thread.join()
    samples.append((time.monotonic() - t0, server.rss_mb()))
    warm = [mb for t, mb in samples if t >= min(60.0, seconds / 3)]
    run["rss_mb"] = [[round(t, 1), round(mb, 1)] for t, mb in samples]
    if len(warm) >= 2:
        run["rss_after_warmup_first_mb"] = warm[0]
        run["rss_after_warmup_last_mb"] = warm[-1]
        run["rss_growth_mb"] = warm[-1] - warm[0]
    return run


def next_question(kind: str) -> dict[str, Any]:
    from bench import adaptive_bench

    if not adaptive_bench.endpoint_present():
        return {"skipped": "`$next-question` is not served by this working tree"}
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        result: dict[str, Any] = pool.submit(
            adaptive_bench.run_database, "sqlite" if kind == "sqlite" else "postgres", 4, 12, 6
        ).result()
    return {
        "calls": result.get("calls"),
        "by_call": result.get("by_call"),
        "mismatch_sessions": result.get("mismatch_sessions"),
    }


def plan_stability(responses: int) -> dict[str, Any]:
    """A private PostgreSQL schema, autovacuum off on each of its tables (storage parameter), no ANALYZE:
    the ingest rate (8 concurrent senders) right after 100 responses and after ``responses``."""
    from bench import ingest_bench

    engine = sa.create_engine(common.PG_SERVER, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {PLAN_SCHEMA} CASCADE")
        conn.exec_driver_sql(f"CREATE SCHEMA {PLAN_SCHEMA}")
    url = f"{common.PG_SERVER}?options=-csearch_path%3D{PLAN_SCHEMA}"
    server = start_norse("postgresql", url, name="norse-plan")
    try:
        with engine.connect() as conn:
            tables = [
                r[0]
                for r in conn.exec_driver_sql(
                    "SELECT tablename FROM pg_tables WHERE schemaname = %(s)s", {"s": PLAN_SCHEMA}
                )
            ]
            for t in tables:
                conn.exec_driver_sql(f'ALTER TABLE {PLAN_SCHEMA}."{t}" SET (autovacuum_enabled = false)')
        window = max(20, min(200, responses // 5))
        n_patients = 100
        with server.client() as client:
            headers = {**server.headers, "Content-Type": FHIR_JSON}
            pids = ingest_bench.create_patients(client, headers, n_patients, "plan")  # type: ignore[arg-type]
        rng = random.Random(77)
        administration = 0
        posted = 0
        errors: list[str] = []

        def bodies(count: int) -> list[bytes]:
            nonlocal administration
            out: list[bytes] = []
            while len(out) < count:
                for pid in pids:
                    out.append(orjson.dumps(ingest_bench.full_length_response(rng, pid, administration)))
                administration += 1
            return out[:count]

        def send(batch: list[bytes]) -> float:
            nonlocal posted
            it = iter(batch)
            lock = threading.Lock()

            def worker() -> None:
                nonlocal posted
                with server.client() as client:
                    while True:
                        with lock:
                            body = next(it, None)
                        if body is None:
                            return
                        r = client.post(
                            "/fhir/QuestionnaireResponse", content=body, headers={"Content-Type": FHIR_JSON}
                        )
                        with lock:
                            posted += 1
                            if r.status_code != 201:
                                errors.append(f"{r.status_code} {r.text[:200]}")

            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda _: worker(), range(8)))
            return time.perf_counter() - t0

        send(bodies(100))
        early_s = send(bodies(window))
        fill = responses - posted - window
        while fill > 0:
            chunk = min(fill, 1000)
            send(bodies(chunk))
            fill -= chunk
            log(f"plan: {posted:,} responses stored")
        late_at = posted
        late_s = send(bodies(window))
        # The same depth of history as the early window, on tables holding ``responses`` responses: new
        # patients, their first administrations. The early window's patients had one or two before
        # theirs, and the late window's about responses/100: scoring reads a patient's history, so the
        # late window's rate also falls with depth, which is not what plan stability is about.
        with server.client() as client:
            headers = {**server.headers, "Content-Type": FHIR_JSON}
            pids = ingest_bench.create_patients(client, headers, n_patients, "plan-fresh")  # type: ignore[arg-type]
        administration = 0
        send(bodies(n_patients))
        fresh_s = send(bodies(window))
        early, late, fresh = window / early_s, window / late_s, window / fresh_s
        return {
            "window": window,
            "early_after": 100,
            "early_per_s": early,
            "late_after": late_at,
            "late_per_s": late,
            "late_history_depth": late_at // n_patients,
            "fresh_after": posted - window,
            "fresh_per_s": fresh,
            "ratio": fresh / early,
            "ratio_same_patients": late / early,
            "errors": len(errors),
            "first_error": errors[:1],
            "autovacuum_off_tables": len(tables),
            "workers": server.info.get("workers"),
        }
    finally:
        server.stop()
        with engine.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {PLAN_SCHEMA} CASCADE")
        engine.dispose()


# ----------------------------------------------------------------------------------------- driver
def machine() -> dict[str, Any]:
    from bench.run_all import machine as base_machine

    info = base_machine()
    info["wrk"] = tool_version(["wrk", "--version"]) if shutil.which("wrk") else None
    info["node"] = tool_version(["node", "--version"]) if shutil.which("node") else None
    info["sekmet-fhir"] = sekmet_version()
    info["medplum"] = medplum_versions()
    return info


def save(label: str, measure: str, data: dict[str, Any]) -> None:
    common.write_json(f"issue14-{label}-{measure}.json", data)


def run(opts: Options) -> dict[str, Any]:
    label = opts.scale
    patients, per_patient = SCALES[opts.scale]
    c_patients, c_per = SCALES[opts.competitor_scale]
    ensure_wrk()
    info: dict[str, Any] = {
        "scale": opts.scale,
        "dataset": {"patients": patients, "per_patient": per_patient},
        "competitor_dataset": {"patients": c_patients, "per_patient": c_per},
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(opts).items()},
        "code": common.code_version(),
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "errors": {},
    }
    t_all = time.perf_counter()
    loads: dict[str, dict[str, Any]]
    if not opts.skip_load:
        log(f"loading {patients:,} x {per_patient} into {', '.join(opts.databases)} (bench.load, bulk)")
        with concurrent.futures.ThreadPoolExecutor(len(opts.databases)) as pool:
            loads = dict(
                zip(
                    opts.databases,
                    pool.map(lambda k: load_norse(k, patients, per_patient, label), opts.databases),
                    strict=True,
                )
            )
    else:  # loaded earlier (`bench.load ... --out issue14-<scale>-load-<kind>.json`): its figures
        loads = {}
        for kind in opts.databases:
            earlier = common.RESULTS / f"issue14-{label}-load-{kind}.json"
            if earlier.exists():
                loads[kind] = dict(json.loads(earlier.read_text()))
    if loads:
        info["load"] = {
            k: {x: v.get(x) for x in ("resources", "load_s", "rate_per_s", "db_bytes")}
            for k, v in loads.items()
        }
    servers: list[Server] = []
    files: dict[str, dict[str, Path]] = {}
    try:
        for kind in opts.databases:
            srv = start_norse(kind, common.database_url(kind))
            servers.append(srv)
            files[srv.name] = request_files(patients, per_patient, f"{label}-norse")
        competitors_wanted = any(m in opts.only for m in ("read", "search", "create"))
        for name in opts.competitors if competitors_wanted else ():
            try:
                srv = start_sekmet() if name == "sekmet" else start_medplum()
            except Exception as exc:  # a competitor that cannot run is left out, and the report says why
                info["errors"][name] = f"not started: {exc}"
                log(f"{name}: {exc}")
                continue
            try:
                log(f"loading {c_patients:,} x {c_per} into {srv.label} through its FHIR API")
                srv.info["load"] = load_via_api(srv, c_patients, c_per)
            except Exception as exc:
                info["errors"][name] = f"load failed: {exc}"
                log(f"{name}: {exc}")
                srv.stop()
                continue
            servers.append(srv)
            files[srv.name] = request_files(c_patients, c_per, f"{label}-{name}")
        info["servers"] = {s.name: {"label": s.label, **s.info} for s in servers}
        earlier_run = common.RESULTS / f"issue14-{label}-run.json"
        if earlier_run.exists():  # a partial rerun (--only): the servers of the earlier run stay described
            earlier = json.loads(earlier_run.read_text()).get("servers", {})
            info["servers"] = {**earlier, **info["servers"]}
        if any(m in opts.only for m in ("read", "search", "create")):
            res = rounds(servers, files, opts)
            save(label, "rounds", res)
        norse = [s for s in servers if s.name.startswith("norse-")]
        for srv in norse:
            kind = srv.info["database"]
            url = common.database_url(kind)
            if "transaction" in opts.only:
                log(f"transaction on {srv.label}")
                save(
                    label,
                    f"transaction-{kind}",
                    transaction(srv, patients, 10 if opts.scale == "small" else 30),
                )
            responses_file: Path | None = None
            if "ingest" in opts.only:
                log(f"ingest on {srv.label}")
                result = ingest(srv, kind, url, opts, f"{label}-{kind}-ingest")
                save(label, f"ingest-{kind}", result)
                responses_file = WORK / f"{label}-{kind}-ingest-responses.txt"
            if "soak" in opts.only:
                log(f"soak on {srv.label} for {opts.soak_seconds} s")
                if responses_file is None:
                    responses_file = ingest_setup(srv, 100, 2000, f"{label}-{kind}-soak")
                save(label, f"soak-{kind}", soak(srv, files[srv.name], responses_file, opts.soak_seconds))
    finally:
        for srv in servers:
            srv.stop()
    if "raw" in opts.only:
        # The hot search's own SQL (the statements the server emits, captured in process, parameters
        # substituted) and a read by id, on one DB-API connection: what the HTTP figures are within.
        from bench import http_bench

        for kind in opts.databases:
            log(f"raw SQL on {kind}")
            try:
                save(
                    label,
                    f"raw-{kind}",
                    http_bench.raw_part(common.database_url(kind), patients, per_patient, 2000, hand=False),
                )
            except Exception as exc:
                save(label, f"raw-{kind}", {"failed": repr(exc)})
    if "next_question" in opts.only:
        for kind in opts.databases:
            log(f"$next-question on {kind}")
            try:
                save(label, f"next_question-{kind}", next_question(kind))
            except Exception as exc:
                save(label, f"next_question-{kind}", {"failed": repr(exc)})
    if "plan" in opts.only and "postgresql" in opts.databases:
        log(f"plan stability on PostgreSQL, {opts.plan_responses:,} responses")
        try:
            save(label, "plan", plan_stability(opts.plan_responses))
        except Exception as exc:
            save(label, "plan", {"failed": repr(exc)})
    info["finished"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    info["total_s"] = time.perf_counter() - t_all
    info["machine"] = machine()
    save(label, "run", info)
    return info


def results(label: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in sorted(common.RESULTS.glob(f"issue14-{label}-*.json")):
        out[path.stem[len(f"issue14-{label}-") :]] = json.loads(path.read_text())
    return out


def available_scales() -> list[str]:
    return [s for s in SCALES if (common.RESULTS / f"issue14-{s}-run.json").exists()]


# ----------------------------------------------------------------------------------------- report
START_MARK = "<!-- issue14:start -->"
END_MARK = "<!-- issue14:end -->"
SECTION_FILE = Path(__file__).resolve().parent / "issue14-results.md"


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _ms(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:,.0f}"


def _ok(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "**not met**")


def _cell(slot: dict[str, Any] | None) -> str:
    if not slot:
        return "-"
    probe = slot.get("probe")
    if "rps" not in slot:
        if probe and probe.get("seconds") is None:
            return f"over {probe['over_s']:.0f} s a query (one probe)"
        if probe:
            return f"{probe['seconds']:.1f} s a query (one probe)"
        fails = [r.get("failed") for r in slot.get("rounds", []) if "failed" in r]
        return f"failed: {str(fails[0])[:80]}" if fails else "-"
    errs = f", {slot['errors']:,} errors" if slot.get("errors") else ""
    if not slot["rps"]:
        return f"0 answers within the run{errs}"
    return f"{_f(slot['rps'])} ({_ms(slot['p50'])} / {_ms(slot['p99'])}){errs}"


def markdown(label: str) -> str:
    r = results(label)
    info = r.get("run", {})
    m = info.get("machine", {})
    servers = info.get("servers", {})
    rounds_ = r.get("rounds", {})
    ds, cds = info.get("dataset", {}), info.get("competitor_dataset", {})
    lines: list[str] = []
    w = lines.append
    w(START_MARK)
    w("# Issue 14: performance against sekmet-fhir and Medplum")
    w("")
    w(
        f"Scale **{label}**, run finished {info.get('finished', '?')} UTC (took "
        f"{_f((info.get('total_s') or 0) / 60)} min); `python -m bench.run_all --issue14 --scale {label}` "
        f"(options: {', '.join(f'`{k}={v}`' for k, v in (info.get('options') or {}).items())}); "
        f"code {info.get('code', {}).get('commit')} with {len(info.get('code', {}).get('changed', []))} "
        "server files changed in the working tree. Raw figures: `bench/results/issue14-*.json`."
    )
    w("")
    w("## Machine")
    w("")
    w(f"- CPU: {m.get('cpu')}, {m.get('cores')} cores; RAM {m.get('ram_gb')} GB; {m.get('os')}")
    w(
        f"- Python {m.get('python')}; SQLite {m.get('sqlite')}; PostgreSQL {m.get('postgresql')}; "
        f"{m.get('wrk') or 'wrk ?'}; node {m.get('node') or '-'}; sekmet-fhir {m.get('sekmet-fhir') or '-'}; "
        + ", ".join(f"{k} {v}" for k, v in (m.get("medplum") or {}).items())
    )
    w(f"- Libraries: {', '.join(f'{k} {v}' for k, v in (m.get('libraries') or {}).items())}")
    workers = {s.get("label"): s.get("workers") for s in servers.values()}
    w(
        "- Server processes: "
        + "; ".join(f"{k}: {v} worker{'s' if v != 1 else ''}" for k, v in workers.items())
        + ". wrk runs on the same cores (threads = min(clients, cores))."
    )
    w("")
    w("## Throughput and latency")
    w("")
    w(
        f"fhir-norse holds {ds.get('patients', 0):,} Patients x {ds.get('per_patient')} Observations "
        f"(`bench.load`, bulk); the competitors hold "
        f"**{cds.get('patients', 0):,} x {cds.get('per_patient')}** "
        f"(the `{(info.get('options') or {}).get('competitor_scale', 'issue')}` dataset, same ids, loaded "
        "through their FHIR API with PUT-by-id batch Bundles). "
        f"wrk, {info.get('options', {}).get('seconds')} s a run, two rounds in opposite order, the mean "
        "of both; req/s (p50 / p99 ms, wrk's histogram)."
    )
    w("")
    order = [n for n in ("norse-sqlite", "norse-postgresql", "sekmet", "medplum") if n in servers]
    w("| req/s (p50 / p99 ms) | clients | " + " | ".join(servers[n]["label"] for n in order) + " |")
    w("|---|---|" + "---|" * len(order))
    for key, title in (
        ("read-1", "read by id"),
        ("read-16", "read by id"),
        ("search-1", "search patient+code, sorted"),
        ("search-16", "search patient+code, sorted"),
        ("create-16", "create"),
    ):
        if key in rounds_:
            w(
                f"| {title} | {key.split('-')[1]} | "
                + " | ".join(_cell(rounds_[key].get(n)) for n in order)
                + " |"
            )
    sek_read = (rounds_.get("read-16", {}).get("sekmet") or {}).get("rps")
    w("")
    if sek_read:
        w(f"Ratio to sekmet-fhir's read throughput at 16 clients in the same run ({_f(sek_read)}/s):")
        w("")
        w("| | " + " | ".join(servers[n]["label"] for n in order if n.startswith("norse-")) + " |")
        w("|---|" + "---|" * sum(1 for n in order if n.startswith("norse-")))
        for key, title in (("read-16", "read by id, 16"), ("search-16", "hot search, 16")):
            cells = []
            for n in order:
                if n.startswith("norse-"):
                    rps = (rounds_.get(key, {}).get(n) or {}).get("rps")
                    cells.append(f"{rps / sek_read:.2f}x" if rps else "-")
            w(f"| {title} | " + " | ".join(cells) + " |")
        w("")
    for name in ("sekmet", "medplum"):
        srv = servers.get(name)
        if srv and srv.get("load"):
            ld = srv["load"]
            w(
                f"- {srv['label']} load: {ld['resources']:,} resources in {ld['seconds']:.0f} s "
                f"({ld['rate_per_s']:,.0f}/s)."
            )
    if "sekmet" in servers:
        w(
            "- sekmet-fhir runs with its defaults (no authentication, strict inbound validation, SQLite, one "
            "uvicorn process) except `log_inbound: false` and `simulator.enabled: false`, the settings its "
            "documentation gives for load runs; fhir-norse keeps its audit trail on every request."
        )
    if any(((rounds_.get("search-16") or {}).get(n) or {}).get("probe") for n in ("sekmet", "medplum")):
        w(
            f"- The hot search on a competitor is probed once first; slower than {SEARCH_PROBE_LIMIT_S:.0f} "
            "s "
            "alone, it gets no wrk run (16 clients would queue minutes of work) and the cell gives the probe."
        )
    for name, err in (info.get("errors") or {}).items():
        w(f"- {name}: {err}")
    w("")
    # ----------------------------------------------------------- targets
    w("## Targets")
    w("")
    dbs = [d for d in ("sqlite", "postgresql") if f"norse-{d}" in servers or f"ingest-{d}" in r]
    w("| Target | " + " | ".join("SQLite" if d == "sqlite" else "PostgreSQL" for d in dbs) + " |")
    w("|---|" + "---|" * len(dbs))

    def row(title: str, fn: Callable[[str], str]) -> None:
        w(f"| {title} | " + " | ".join(fn(d) for d in dbs) + " |")

    def slot(key: str, d: str) -> dict[str, Any]:
        return rounds_.get(key, {}).get(f"norse-{d}") or {}

    def ratio_cell(key: str, d: str) -> str:
        rps = slot(key, d).get("rps")
        if not rps or not sek_read:
            return "not measured"
        return f"{rps / sek_read:.2f}x: {_ok(rps / sek_read >= TARGETS['ratio_to_sekmet_read'])}"

    def p99_cell(key: str, d: str) -> str:
        p = slot(key, d).get("p99")
        return "not measured" if p is None else f"{_ms(p)} ms: {_ok(p <= TARGETS['p99_16_ms'])}"

    row("read by id, 16 clients, >= 3x sekmet-fhir's reads", lambda d: ratio_cell("read-16", d))
    row("hot search, 16 clients, >= 3x sekmet-fhir's reads", lambda d: ratio_cell("search-16", d))
    row("read by id, 16 clients, p99 <= 20 ms", lambda d: p99_cell("read-16", d))
    row("hot search, 16 clients, p99 <= 20 ms", lambda d: p99_cell("search-16", d))

    def read1(d: str) -> str:
        p = slot("read-1", d).get("p50")
        return "not measured" if p is None else f"{_ms(p)} ms: {_ok(p <= TARGETS['read1_p50_ms'])}"

    row("read by id, 1 client, p50 <= 1.5 ms", read1)

    def over_raw(d: str) -> str:
        raw = (r.get(f"raw-{d}") or {}).get("hot_server_sql") or {}
        http = slot("search-1", d).get("p50")
        if not raw.get("p50") or http is None:
            return "not measured"
        ratio = http / raw["p50"]
        return (
            f"HTTP p50 {_ms(http)} ms (1 client) / raw SQL p50 {_ms(raw['p50'])} ms = {ratio:.1f}x: "
            f"{_ok(ratio <= TARGETS['search_over_raw'])}"
        )

    row("hot search within 3x of its raw SQL", over_raw)

    def create(d: str) -> str:
        v = slot("create-16", d).get("rps")
        return "not measured" if v is None else f"{_f(v)}/s: {_ok(v >= TARGETS['create_per_s'])}"

    row("create, 16 clients, >= 800/s", create)

    def tx(d: str) -> str:
        t = r.get(f"transaction-{d}")
        if not t or "p50" not in t:
            return "not measured"
        return f"p50 {_ms(t['p50'])} / max {_ms(t['max'])} ms: {_ok(t['max'] <= TARGETS['transaction_ms'])}"

    row("100-entry transaction <= 100 ms (p50 / max)", tx)

    def ing(d: str) -> str:
        t = r.get(f"ingest-{d}")
        if not t or "rps" not in t:
            return "not measured"
        ok = (
            t["rps"] >= TARGETS["ingest_per_s"]
            and t["p99"] <= TARGETS["ingest_p99_ms"]
            and not t["error_count"]
        )
        errs = f", {t['error_count']} errors" if t["error_count"] else ""
        return f"{_f(t['rps'])}/s, p99 {_ms(t['p99'])} ms{errs}: {_ok(ok)}"

    row("NF response ingest + scoring, 8 clients, >= 100/s, p99 <= 150 ms", ing)

    def nq(d: str) -> str:
        t = r.get(f"next_question-{d}") or {}
        p = (t.get("calls") or {}).get("p99")
        if p is None:
            return str(t.get("skipped") or t.get("failed", "not measured"))[:80]
        return f"{_ms(p)} ms ({t['calls']['n']} calls): {_ok(p <= TARGETS['next_question_p99_ms'])}"

    row("`$next-question` p99 <= 15 ms", nq)

    def sk(d: str) -> str:
        t = r.get(f"soak-{d}")
        if not t or "rps" not in t:
            return "not measured"
        growth = t.get("rss_growth_mb")
        ok = not t["error_count"] and t["p99"] <= TARGETS["soak_p99_ms"]
        return (
            f"{t['seconds']:.0f} s, {t['requests']:,} requests, {t['error_count']} errors, "
            f"p99 {_ms(t['p99'])} ms, "
            f"RSS growth after warm-up {_f(growth)} MB: {_ok(ok)}"
        )

    row("mixed soak, 20 clients: 0 errors, p99 <= 100 ms, memory flat", sk)

    def by(d: str) -> str:
        t = r.get(f"ingest-{d}")
        b = (t or {}).get("bytes_per_response")
        if t is None or b is None:
            return "not measured"
        return f"{b / 1000:,.0f} KB ({t['stored']:,} responses): {_ok(b <= TARGETS['bytes_per_response'])}"

    row("database bytes per stored response <= 275 KB (half of ~550 KB)", by)

    def pl(d: str) -> str:
        if d != "postgresql":
            return "(PostgreSQL only)"
        t = r.get("plan")
        if not t or "ratio" not in t:
            return str((t or {}).get("failed", "not measured"))[:80]
        if "fresh_per_s" not in t:
            return (
                f"{_f(t['early_per_s'])}/s after {t['early_after']}, {_f(t['late_per_s'])}/s after "
                f"{t['late_after']:,}: ratio {t['ratio']:.2f}: {_ok(t['ratio'] >= TARGETS['plan_ratio'])}"
            )
        return (
            f"{_f(t['early_per_s'])}/s after {t['early_after']}; after {t['fresh_after']:,}, new patients "
            f"(same history depth): {_f(t['fresh_per_s'])}/s, ratio {t['ratio']:.2f}: "
            f"{_ok(t['ratio'] >= TARGETS['plan_ratio'])}; the first patients, "
            f"{t['late_history_depth']} administrations deep: {_f(t['late_per_s'])}/s "
            f"(ratio {t['ratio_same_patients']:.2f}, the cost of history)"
        )

    row("ingest rate after N responses within 20 % of after 100 (autovacuum off)", pl)
    w("")
    # ----------------------------------------------------------- details
    soaks = [(d, r[f"soak-{d}"]) for d in dbs if f"soak-{d}" in r and "rss_mb" in r[f"soak-{d}"]]
    if soaks:
        w("Server RSS during the soak (parent + workers, MB, every 10 s):")
        w("")
        for d, t in soaks:
            w(f"- {d}: " + ", ".join(f"{int(s)} s {mb:.0f}" for s, mb in t["rss_mb"]))
            if t.get("counts"):
                w(f"  - sent: {', '.join(f'{k} {v:,}' for k, v in t['counts'].items())}")
        w("")
    w(
        "How: `bench/issue14.py` (driver), `bench/wrk/*.lua` (wrk scripts: `get.lua` reads a random path per "
        "request from a file, `post.lua` posts bodies from a file, `soak.lua` mixes reads 50 %, "
        "searches 30 %, "
        "creates 15 %, scored responses 5 %), `bench/medplum/server.mjs` (Medplum's FhirRouter + "
        "MemoryRepository behind node:http). The ingest bodies are `bench.ingest_bench`'s full-length "
        "NF 2.1 responses for 100 patients (each in an EpisodeOfCare), posted in order; bytes per response "
        "= (database size after - before) / responses stored (SQLite: file + WAL after a checkpoint; "
        "PostgreSQL: `pg_total_relation_size` summed over the schema's tables). `$next-question`: "
        "`bench.adaptive_bench`'s sessions against a fresh database. Plan stability: a fresh PostgreSQL "
        "schema with `autovacuum_enabled = false` on each table, never analyzed, 8 concurrent senders."
    )
    w(END_MARK)
    return "\n".join(lines) + "\n"


def splice(text: str, section: str) -> str:
    """BENCHMARKS.md with the Issue 14 section replaced (or put first, before the older sections)."""
    if START_MARK in text and END_MARK in text:
        head, rest = text.split(START_MARK, 1)
        tail = rest.split(END_MARK, 1)[1].lstrip("\n")
        return head + section + ("\n" + tail if tail else "")
    return section + ("\n" + text if text else "")


def write_report(label: str) -> Path:
    """The report of a run: the full scale's (the one the targets are judged at) goes into
    BENCHMARKS.md and bench/issue14-results.md; a smaller scale's only into bench/results/
    (git-ignored), so a quick check never replaces the published figures."""
    section = markdown(label)
    if label != "full":
        target = common.ROOT / "bench" / "results" / f"issue14-{label}.md"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(section, encoding="utf-8")
        return target
    SECTION_FILE.write_text(section, encoding="utf-8")
    target = common.ROOT / "BENCHMARKS.md"
    old = target.read_text(encoding="utf-8") if target.exists() else ""
    target.write_text(splice(old, section), encoding="utf-8")
    return target
