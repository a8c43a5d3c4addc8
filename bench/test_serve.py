"""Serving and batch-QA figures (`make bench-serve`): load test of the real server against a naive one, and batch QA
over the SQuAD 2.0 dev set locally and on a 2-actor Ray cluster, with a killed worker and a resumed job.

Every served answer is checked against a direct `QAEngine.answer_batch` of the same inputs. Results go to
bench/results/serve.json and bench/results/batch_qa.json. `python -m bench.test_serve naive ARTIFACT --port P`
runs the naive server (one `QAEngine.answer` per request, no batching) used as the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.common import ROOT, THREADS, cpu_name, minilm
from engine.serve.app import AnswerRequest  # module level: FastAPI resolves the annotation

RESULTS = ROOT / "bench" / "results"
CLIENTS = (1, 8, 32)
SERVE_N = int(os.environ.get("SPARSEQA_SERVE_QUESTIONS", "384"))  # dev questions per load level
SCORE_ATOL = 1e-3  # packed batches of other sizes change logits in the last bits only


def _dev_examples(limit: int | None) -> list:
    from bench.test_workload import _dev_path
    from engine.data.squad import load_squad

    path = _dev_path()
    if path is None:
        pytest.skip("SQuAD 2.0 dev set not found (../shared/data/squad2/dev-v2.0.json.gz or $SPARSEQA_DATA)")
    ex = load_squad(path)
    return ex[:limit] if limit else ex


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same(a: dict, ref: dict) -> bool:
    keys = ("text", "start", "end", "no_answer")
    return all(a[k] == ref[k] for k in keys) and abs(a["score"] - ref["score"]) <= SCORE_ATOL


# ----------------------------------------------------------------------------------------------- load test


def naive_app(engine):
    """The baseline: one `QAEngine.answer` per request in FastAPI's thread pool, no batching."""
    from fastapi import FastAPI

    app = FastAPI(title="naive")

    @app.post("/v1/answer")
    def answer(body: AnswerRequest):
        return engine.answer(
            body.question, body.context, body.top_k, body.max_answer_length, body.null_threshold
        ).to_dict()

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app


class Server:
    """A server process on a free port; waits for /healthz, stops with SIGTERM."""

    def __init__(self, args: list[str]):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, *args, "--port", str(self.port), "--log-level", "warning"], env=_env(), cwd=ROOT
        )
        import httpx

        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server {args} did not come up")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


async def _load(url: str, items: list[dict], clients: int) -> tuple[list, list[float], int, float]:
    """`clients` concurrent clients send every item once; (responses by item, latencies, errors, seconds)."""
    import httpx

    out: list = [None] * len(items)
    lat: list[float] = []
    errors = 0
    nxt = iter(range(len(items)))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in nxt:
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/v1/answer", json=items[i])
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            lat.append(time.perf_counter() - t0)
            if ok:
                out[i] = r.json()
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return out, lat, errors, time.perf_counter() - t0


def test_serve_load():
    """Throughput and latency at 1, 8 and 32 clients, batched server vs naive server, every answer checked."""
    from engine.qa import QAEngine

    art = minilm("half").artifact
    ex = _dev_examples(SERVE_N)
    items = [{"question": e.question, "context": e.context} for e in ex]
    eng = QAEngine.load(art, backend="cpp", threads=THREADS)
    eng.answer_batch([(it["question"], it["context"]) for it in items[:32]])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    ref = [a.to_dict() for a in eng.answer_batch([(it["question"], it["context"]) for it in items], 32)]
    engine_qps = len(items) / (time.perf_counter() - t0)
    engine_q_per_cpu_s = len(items) / (time.process_time() - c0)
    del eng
    servers = {
        "batched": ["-m", "engine.serve", str(art), "--backend", "cpp", "--threads", str(THREADS)],
        "batched-2-workers": [
            "-m",
            "engine.serve",
            str(art),
            "--backend",
            "cpp",
            "--threads",
            str(THREADS),
            "--workers",
            "2",
        ],
        "naive": ["-m", "bench.test_serve", "naive", str(art), "--backend", "cpp", "--threads", str(THREADS)],
    }
    rows = []
    for clients in CLIENTS:
        for name, args in servers.items():
            srv = Server(args)
            try:
                asyncio.run(_load(srv.url, items[:16], min(clients, 8)))  # warm-up
                cpu0 = srv.cpu_seconds()
                out, lat, errors, secs = asyncio.run(_load(srv.url, items, clients))
                cpu = srv.cpu_seconds() - cpu0
            finally:
                srv.stop()
            wrong = sum(o is not None and not _same(o, r) for o, r in zip(out, ref))
            lost = sum(o is None for o in out)
            rows.append(
                {
                    "server": name,
                    "clients": clients,
                    "questions": len(items),
                    "qps": len(items) / secs,
                    "p50_ms": 1000 * float(np.percentile(lat, 50)),
                    "p99_ms": 1000 * float(np.percentile(lat, 99)),
                    "server_cpu_s": cpu,
                    "q_per_cpu_s": len(items) / cpu,
                    "load_average_1m": os.getloadavg()[0],
                    "errors": errors,
                    "lost": lost,
                    "mismatched": wrong,
                }
            )
            print(rows[-1], flush=True)
    by = {(r["server"], r["clients"]): r for r in rows}
    result = {
        "model": "minilm-half",
        "dtype": "float32",
        "backend": "cpp",
        "threads": THREADS,
        "device": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "note": "shared 2-core machine under other users' load; one run; client, server and others compete",
        "engine_answer_batch_qps": engine_qps,
        "engine_answer_batch_q_per_cpu_s": engine_q_per_cpu_s,
        "rows": rows,
        "speedup_vs_naive": {c: by["batched", c]["qps"] / by["naive", c]["qps"] for c in CLIENTS},
        "cpu_efficiency_vs_naive": {
            c: by["batched", c]["q_per_cpu_s"] / by["naive", c]["q_per_cpu_s"] for c in CLIENTS
        },
        "served_vs_answer_batch": {c: by["batched", c]["qps"] / engine_qps for c in CLIENTS},
        "served_vs_answer_batch_per_cpu_s": {c: by["batched", c]["q_per_cpu_s"] / engine_q_per_cpu_s for c in CLIENTS},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    assert all(r["errors"] == 0 and r["lost"] == 0 and r["mismatched"] == 0 for r in rows if r["server"] == "batched")


# ----------------------------------------------------------------------------------------------- batch QA


def _write_pairs(path: Path, ex: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps({"id": e.qid, "question": e.question, "context": e.context}, ensure_ascii=False) + "\n"
            for e in ex
        )


def _batch_qa(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "engine.batch_qa", *args],
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **kw,
    )


def _check_output(path: Path, ref: dict[str, dict]) -> dict:
    """Counts of the output against the reference answers by id."""
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    ids = [x["id"] for x in lines]
    return {
        "lines": len(lines),
        "unique_ids": len(set(ids)),
        "missing": len(set(ref) - set(ids)),
        "mismatched": sum(not _same(x, ref[x["id"]]) for x in lines if x["id"] in ref),
    }


def _record(key: str, value: dict) -> None:
    path = RESULTS / "batch_qa.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2) + "\n")


def _reference(art: Path, ex: list) -> tuple[dict[str, dict], float]:
    from engine.qa import QAEngine

    eng = QAEngine.load(art, backend="cpp", threads=THREADS)
    t0 = time.perf_counter()
    answers = eng.answer_batch([(e.question, e.context) for e in ex], 32)
    return {e.qid: a.to_dict() for e, a in zip(ex, answers)}, time.perf_counter() - t0


def test_batch_qa_dev(tmp_path):
    """All dev questions (SPARSEQA_WORKLOAD_LIMIT caps them): local batch_qa (QAEngine.answer_batch, 32 rows at a
    time), then Ray with 2 actors x 1 thread; the Ray output must equal the local one on every id."""
    limit = int(os.environ.get("SPARSEQA_WORKLOAD_LIMIT", "0")) or None
    art = minilm("half").artifact
    ex = _dev_examples(limit)
    pairs = tmp_path / "dev.jsonl"
    _write_pairs(pairs, ex)
    runs = {"local": ["--threads", str(THREADS)], "ray": ["--ray", "--workers", "2", "--threads", "1"]}
    out = {
        "questions": len(ex),
        "model": "minilm-half",
        "backend": "cpp",
        "device": cpu_name(),
        "note": "shared 2-core machine under other users' load; seconds include engine load and Ray start",
    }
    ref: dict[str, dict] = {}
    for name, extra in runs.items():
        dest = tmp_path / f"{name}.jsonl"
        t0 = time.perf_counter()
        load0 = os.getloadavg()[0]
        rc = _batch_qa(
            ["--artifact", str(art), "--input", str(pairs), "--output", str(dest), "--backend", "cpp", *extra]
        ).wait()
        secs = time.perf_counter() - t0
        assert rc == 0, name
        if not ref:  # the local run is answer_batch's output: the reference for the others
            ref = {x["id"]: x for x in map(json.loads, dest.read_text(encoding="utf-8").splitlines())}
        out[name] = {
            "args": extra,
            "seconds": secs,
            "qps": len(ex) / secs,
            "load_average_1m": [load0, os.getloadavg()[0]],
            **_check_output(dest, ref),
        }
        print(name, out[name], flush=True)
        _record("dev", out)
    for name in runs:
        assert out[name]["lines"] == out[name]["unique_ids"] == len(ex) and out[name]["mismatched"] == 0


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_batch_qa_ray_kill_and_resume(tmp_path):
    """Kill a Ray actor mid-job (Ray restarts it), then kill the whole job; --resume completes it exactly once."""
    n = int(os.environ.get("SPARSEQA_RESUME_QUESTIONS", "2048"))
    art = minilm("half").artifact
    ex = _dev_examples(n)
    pairs, dest = tmp_path / "dev.jsonl", tmp_path / "out.jsonl"
    _write_pairs(pairs, ex)
    ref, _ = _reference(art, ex)
    args = [
        "--artifact",
        str(art),
        "--input",
        str(pairs),
        "--output",
        str(dest),
        "--backend",
        "cpp",
        "--ray",
        "--workers",
        "2",
        "--threads",
        "1",
        "--shard-size",
        "128",
    ]
    shards = dest.with_name(dest.name + ".shards")
    job = _batch_qa(args, start_new_session=True)

    def done():
        return len(list(shards.glob("0*[0-9].jsonl"))) if shards.is_dir() else 0

    killed_actor = None
    try:
        while done() < 2 and job.poll() is None:
            time.sleep(0.5)
        actors = [p for p in _descendants(job.pid) if "_RayAnswerer" in _cmdline(p) or "MapWorker" in _cmdline(p)]
        if actors:
            killed_actor = {"pid": actors[0], "cmdline": _cmdline(actors[0]).strip()}
            os.kill(actors[0], signal.SIGKILL)
        shards_at_actor_kill = done()
        while done() < 6 and job.poll() is None:
            time.sleep(0.5)
        shards_at_crash = done()
    finally:
        family = _descendants(job.pid)
        os.killpg(job.pid, signal.SIGKILL)  # the driver's own session: the job dies mid-flight
        job.wait()
        for p in family:  # Ray daemons that left the session
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    t0 = time.perf_counter()
    assert _batch_qa([*args, "--resume"]).wait() == 0
    check = _check_output(dest, ref)
    res = {
        "questions": len(ex),
        "shard_size": 128,
        "killed_actor": killed_actor,
        "shards_written_at_actor_kill": shards_at_actor_kill,
        "shards_written_before_job_killed": shards_at_crash,
        "shards_total": (len(ex) + 127) // 128,
        "resume_seconds": time.perf_counter() - t0,
        **check,
    }
    print(res, flush=True)
    _record("ray_kill_and_resume", res)
    assert check["lines"] == check["unique_ids"] == len(ex) and check["missing"] == 0 and check["mismatched"] == 0


def main(argv: list[str] | None = None) -> int:
    """`naive ARTIFACT --port P`: run the naive baseline server."""
    p = argparse.ArgumentParser(prog="python -m bench.test_serve")
    p.add_argument("mode", choices=["naive"])
    p.add_argument("artifact")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    import uvicorn

    from engine.qa import QAEngine

    uvicorn.run(
        naive_app(QAEngine.load(a.artifact, backend=a.backend, threads=a.threads)),
        host=a.host,
        port=a.port,
        log_level=a.log_level,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
