"""engine.serve: the real app in-process (ASGI) for answers, batching, every error status, disconnects and the queue
bound; one real uvicorn process for SIGTERM draining. References: QAEngine.answer / answer_batch of the same inputs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from engine.build_model import build
from engine.qa import QAEngine
from engine.serve import BatchConfig, Batcher, Job, ServeConfig, create_app
from engine.serve.batcher import Closed
from tests.conftest import SMALL_WINDOWS, qa_pairs

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def artifact(tiny_bert, tmp_path_factory) -> Path:
    return build(tiny_bert, tmp_path_factory.mktemp("serve") / "a", settings=SMALL_WINDOWS)


@pytest.fixture(scope="module")
def engine(artifact) -> QAEngine:
    return QAEngine.load(artifact, backend="torch")


class GatedBackend:
    """Wraps a backend: each forward waits for `gate` (after setting `entered`); records batch sizes; can fail once."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.gate, self.entered = threading.Event(), threading.Event()
        self.calls: list[int] = []  # sequences per forward
        self.fail_next = False

    def forward_packed(self, ids, types, cu, longest):
        self.entered.set()
        assert self.gate.wait(30), "test gate never opened"
        self.calls.append(cu.numel() - 1)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected backend failure")
        return self.inner.forward_packed(ids, types, cu, longest)


def _gated(engine: QAEngine) -> tuple[QAEngine, GatedBackend]:
    backend = GatedBackend(engine.backend)
    return QAEngine(engine.artifact, backend), backend


@asynccontextmanager
async def _client(app):
    """The app with its lifespan (batcher started, drained at exit), behind an in-process ASGI client."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://sparseqa", timeout=60) as c:
            yield c


def _body(q: str, c: str, **kw) -> dict:
    return {"question": q, "context": c, **kw}


def _close(a: dict, b: dict) -> bool:
    """Same span and flags; scores equal up to packing noise (other batch neighbours)."""
    return all(a[k] == b[k] for k in ("text", "start", "end", "no_answer")) and abs(a["score"] - b["score"]) < 1e-4


def test_answer_matches_engine(engine):
    q, c = qa_pairs(1)[0]

    async def go():
        async with _client(create_app(engine)) as cl:
            one = (await cl.post("/v1/answer", json=_body(q, c))).json()
            top = (await cl.post("/v1/answer", json=_body(q, c, top_k=3, max_answer_length=4))).json()
            null = (await cl.post("/v1/answer", json=_body(q, c, null_threshold=-1e9))).json()
            return one, top, null

    one, top, null = asyncio.run(go())
    assert _close(one, engine.answer(q, c).to_dict())
    ref = engine.answer(q, c, top_k=3, max_answer_length=4)
    assert len(top) == 3 and all(_close(a, b.to_dict()) for a, b in zip(top, ref))
    assert null["no_answer"] and (null["text"], null["start"], null["end"]) == ("", 0, 0)


def test_concurrent_clients_get_their_own_answers(engine):
    pairs = qa_pairs(48)
    ref = [a.to_dict() for a in engine.answer_batch(pairs)]
    app = create_app(engine, ServeConfig(BatchConfig(max_batch_tokens=300, max_wait_ms=20, max_queue=64)))

    async def go():
        async with _client(app) as cl:
            singles = await asyncio.gather(*(cl.post("/v1/answer", json=_body(q, c)) for q, c in pairs))
            batch = await cl.post("/v1/answer_batch", json=[_body(q, c) for q, c in pairs[::-1]])
            metrics = (await cl.get("/metrics")).text
            return singles, batch, metrics

    singles, batch, metrics = asyncio.run(go())
    assert [r.status_code for r in singles] == [200] * len(pairs)
    assert all(_close(r.json(), a) for r, a in zip(singles, ref))
    assert batch.status_code == 200 and all(_close(x, a) for x, a in zip(batch.json(), ref[::-1]))
    samples = _samples(metrics)
    assert samples["sparseqa_batch_requests_sum"] > samples["sparseqa_batch_requests_count"]  # requests coalesced
    assert samples['sparseqa_requests_total{endpoint="/v1/answer",status="200"}'] == len(pairs)


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_batcher_token_budget_and_order(engine):
    """Batches hold whole jobs within the token budget (a larger job runs alone); each job gets its own logits."""
    gated, backend = _gated(engine)
    pairs = qa_pairs(21)
    jobs = [Job(engine.windows.windows(q, c)) for q, c in pairs]
    seen: list[tuple[int, int, int]] = []
    batcher = Batcher(
        gated, BatchConfig(max_batch_tokens=150, max_wait_ms=50, max_queue=64, workers=1), lambda *a: seen.append(a)
    )
    batcher.start()
    batcher.submit(jobs[:1])
    assert backend.entered.wait(30)
    batcher.submit(jobs[1:])  # all queued while the worker is busy: the next batches draw on all of them
    backend.gate.set()
    results = [j.future.result(30) for j in jobs]
    batcher.close()
    assert sum(s[0] for s in seen) == len(jobs) and max(s[0] for s in seen) > 1
    assert all(tokens <= 150 or n_jobs == 1 for n_jobs, _, tokens in seen)
    for job, (q, c), (s, e) in zip(jobs, pairs, results):
        assert len(s) == len(job.windows)
        assert _close(engine.decode_answers(c, job.windows, s, e).to_dict(), engine.answer(q, c).to_dict())
    with pytest.raises(Closed):
        batcher.submit(jobs[:1])


def test_two_workers_overlap_forwards_and_keep_answers_apart(engine):
    """With 2 workers a second batch starts while the first is still inside its forward; nothing gets mixed up."""
    gated, backend = _gated(engine)
    inside, both_in = [0], threading.Event()
    lock = threading.Lock()
    forward = backend.forward_packed

    def counting(*args):
        with lock:
            inside[0] += 1
            if inside[0] == 2:
                both_in.set()
        try:
            return forward(*args)
        finally:
            with lock:
                inside[0] -= 1

    backend.forward_packed = counting
    pairs = qa_pairs(6)
    jobs = [Job(engine.windows.windows(q, c)) for q, c in pairs]
    batcher = Batcher(gated, BatchConfig(max_batch_tokens=10_000, max_wait_ms=0, max_queue=64, workers=2))
    batcher.start()
    batcher.submit(jobs[:1])
    assert backend.entered.wait(30)
    batcher.submit(jobs[1:])  # the idle worker takes these while the first forward is held at the gate
    assert both_in.wait(30), "the second worker never entered a forward while the first was inside one"
    backend.gate.set()
    results = [j.future.result(30) for j in jobs]
    batcher.close()
    for job, (q, c), (s, e) in zip(jobs, pairs, results):
        assert _close(engine.decode_answers(c, job.windows, s, e).to_dict(), engine.answer(q, c).to_dict())


def test_batch_config_rejects_zero_workers():
    with pytest.raises(ValueError, match="workers"):
        BatchConfig(workers=0)


@pytest.mark.parametrize(
    "body, why",
    [
        ('{"question": "who", "context": ', "malformed JSON"),
        ('{"question": 5, "context": "the king"}', "question not a string"),
        ('{"question": "who", "context": "the king", "top_k": "3"}', "top_k as a string"),
        ('{"question": "who", "context": "the king", "top_k": 0}', "top_k < 1"),
        ('{"question": "who", "context": "the king", "colour": "red"}', "unknown field"),
        ('{"question": "who"}', "missing context"),
        ('["who", "the king"]', "not an object"),
        ('{"question": "   ", "context": "the king"}', "question without tokens"),
    ],
)
def test_bad_requests_get_422_and_server_lives(engine, body, why):
    async def go():
        async with _client(create_app(engine)) as cl:
            bad = await cl.post("/v1/answer", content=body, headers={"content-type": "application/json"})
            ok = await cl.post("/v1/answer", json=_body(*qa_pairs(1)[0]))
            return bad, ok

    bad, ok = asyncio.run(go())
    assert bad.status_code == 422, why
    assert "detail" in bad.json()
    assert ok.status_code == 200


def test_oversize_gets_413(engine):
    cfg = ServeConfig(BatchConfig(max_queue=4), max_context_chars=200)
    q, c = qa_pairs(1)[0]

    async def go():
        async with _client(create_app(engine, cfg)) as cl:
            return [
                await cl.post("/v1/answer", json=_body(q, "word " * 100)),
                await cl.post("/v1/answer", json=_body("why " * 100, c)),
                await cl.post("/v1/answer_batch", json=[_body(q, c)] * 5),
                await cl.post("/v1/answer_batch", json=[_body(q, c), _body(q, "x" * 201)]),
                await cl.post("/v1/answer", json=_body(q, c)),
            ]

    r = asyncio.run(go())
    assert [x.status_code for x in r] == [413, 413, 413, 413, 200]
    assert "--max-context-chars" in r[0].json()["detail"] and "--max-queue" in r[2].json()["detail"]


def test_queue_limit_503_with_retry_after(engine):
    gated, backend = _gated(engine)
    app = create_app(gated, ServeConfig(BatchConfig(max_wait_ms=0, max_queue=2, workers=1)))
    pairs = qa_pairs(4)

    async def go():
        async with _client(app) as cl:
            first = asyncio.ensure_future(cl.post("/v1/answer", json=_body(*pairs[0])))
            await asyncio.to_thread(backend.entered.wait, 30)  # the worker holds request 0 in its forward
            queued = [asyncio.ensure_future(cl.post("/v1/answer", json=_body(*p))) for p in pairs[1:3]]
            while app.state.batcher.depth < 2:
                await asyncio.sleep(0.01)
            full = await cl.post("/v1/answer", json=_body(*pairs[3]))
            full_batch = await cl.post("/v1/answer_batch", json=[_body(*pairs[3])])
            backend.gate.set()
            return full, full_batch, [await f for f in [first, *queued]]

    full, full_batch, served = asyncio.run(go())
    assert full.status_code == full_batch.status_code == 503
    assert full.headers["retry-after"] == "1" and "queue full" in full.json()["detail"]
    assert [r.status_code for r in served] == [200, 200, 200]
    assert all(_close(r.json(), engine.answer(*p).to_dict()) for r, p in zip(served, pairs))


def test_client_disconnect_costs_nothing(engine):
    """A client that leaves while queued: its job never runs, others are unaffected."""
    gated, backend = _gated(engine)
    app = create_app(gated, ServeConfig(BatchConfig(max_wait_ms=0, max_queue=8, workers=1)))
    pairs = qa_pairs(3)

    async def go():
        async with _client(app) as cl:
            first = asyncio.ensure_future(cl.post("/v1/answer", json=_body(*pairs[0])))
            await asyncio.to_thread(backend.entered.wait, 30)
            leave = asyncio.Event()
            sent: list[dict] = []
            body = json.dumps(_body(*pairs[1])).encode()
            messages = iter([{"type": "http.request", "body": body, "more_body": False}])

            async def receive():
                msg = next(messages, None)
                if msg is None:
                    await leave.wait()
                    return {"type": "http.disconnect"}
                return msg

            async def send(msg):
                sent.append(msg)

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/v1/answer",
                "raw_path": b"/v1/answer",
                "query_string": b"",
                "root_path": "",
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                "client": ("127.0.0.1", 1),
                "server": ("sparseqa", 80),
            }
            gone = asyncio.ensure_future(app(scope, receive, send))
            while app.state.batcher.depth < 1:
                await asyncio.sleep(0.01)
            leave.set()
            await gone
            depth_after = app.state.batcher.depth
            backend.gate.set()
            r0 = await first
            r2 = await cl.post("/v1/answer", json=_body(*pairs[2]))
            metrics = (await cl.get("/metrics")).text
            return depth_after, r0, r2, sent, metrics

    depth_after, r0, r2, sent, metrics = asyncio.run(go())
    assert depth_after == 0
    windows = [len(engine.windows.windows(*p)) for p in pairs]
    assert backend.calls == [windows[0], windows[2]]  # the departed client's windows never ran
    assert r0.status_code == r2.status_code == 200
    assert _close(r2.json(), engine.answer(*pairs[2]).to_dict())
    assert all(m.get("status") in (None, 499) for m in sent)
    assert _samples(metrics)['sparseqa_requests_total{endpoint="/v1/answer",status="499"}'] == 1


def test_engine_failure_is_500_and_worker_lives(engine):
    gated, backend = _gated(engine)
    backend.gate.set()
    backend.fail_next = True

    async def go():
        async with _client(create_app(gated)) as cl:
            return [await cl.post("/v1/answer", json=_body(*p)) for p in qa_pairs(2)] + [await cl.get("/metrics")]

    bad, ok, metrics = asyncio.run(go())
    assert bad.status_code == 500 and ok.status_code == 200
    counts = _samples(metrics.text)
    assert counts['sparseqa_requests_total{endpoint="/v1/answer",status="500"}'] == 1
    assert counts['sparseqa_requests_total{endpoint="/v1/answer",status="200"}'] == 1


def test_healthz_metrics_docs(engine):
    async def go():
        async with _client(create_app(engine)) as cl:
            await cl.post("/v1/answer", json=_body(*qa_pairs(1)[0]))
            return [await cl.get(p) for p in ("/healthz", "/metrics", "/docs", "/openapi.json", "/nope")]

    health, metrics, docs, openapi, missing = asyncio.run(go())
    h = health.json()
    assert health.status_code == 200 and h["status"] == "ok" and h["backend"] == "torch"
    assert (h["artifact"], h["layers"], h["heads"], h["ffn"]) == (
        engine.artifact.path.name,
        len(engine.cfg.heads),
        list(engine.cfg.heads),
        list(engine.cfg.ffn),
    )
    for name in (
        "sparseqa_requests_total",
        "sparseqa_request_latency_seconds_bucket",
        "sparseqa_batch_tokens_sum",
        "sparseqa_batch_windows_count",
        "sparseqa_queue_depth",
    ):
        assert name in metrics.text
    assert docs.status_code == 200 and "/v1/answer_batch" in openapi.json()["paths"]
    assert missing.status_code == 404


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_server_sigterm_drains_in_flight(artifact, engine):
    """A uvicorn process: requests in flight when SIGTERM arrives still get their answers, then it exits."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.serve",
            str(artifact),
            "--port",
            str(port),
            "--backend",
            "torch",
            "--max-wait-ms",
            "1500",
            "--max-batch-tokens",
            "100000",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.time() < deadline and proc.poll() is None, "server did not start"
                time.sleep(0.2)
        pairs = qa_pairs(6)

        async def go():
            async with httpx.AsyncClient(base_url=url, timeout=60) as cl:
                calls = [asyncio.ensure_future(cl.post("/v1/answer", json=_body(*p))) for p in pairs]
                await asyncio.sleep(0.5)  # all six sit in the batcher, waiting for company
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*calls)

        got = asyncio.run(go())
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [r.status_code for r in got] == [200] * len(pairs)
    assert all(_close(r.json(), engine.answer(*p).to_dict()) for r, p in zip(got, pairs))
    assert rc in (0, -signal.SIGTERM), proc.stdout.read().decode()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/healthz", timeout=2)
