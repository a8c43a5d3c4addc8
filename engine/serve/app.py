"""The HTTP API over one QAEngine: /v1/answer, /v1/answer_batch, /healthz, /metrics (FastAPI + a Batcher).

Request path: validate (pydantic, 422) -> size limits (413) -> windows in a worker thread -> queue (503 when full)
-> the batcher's packed forward -> decode in a worker thread -> JSON. A client that leaves while its request is
still queued gets its jobs cancelled, so it costs no forward.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio.to_thread
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from engine.qa import Answer, QAEngine
from engine.serve.batcher import BatchConfig, Batcher, Closed, Job, QueueFull

ENDPOINTS = ("/v1/answer", "/v1/answer_batch", "/healthz", "/metrics")


@dataclass(frozen=True)
class ServeConfig:
    """Server limits on top of the batching knobs."""

    batch: BatchConfig = field(default_factory=BatchConfig)
    max_context_chars: int = 100_000  # longer contexts (or questions) get 413
    retry_after_s: int = 1  # Retry-After of a 503


class AnswerRequest(BaseModel):
    """One question over one context (strict JSON types: a number is not a string)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    question: str
    context: str
    top_k: int = Field(1, ge=1, le=50)
    max_answer_length: int = Field(30, ge=1, le=512)
    null_threshold: float | None = None


class AnswerOut(BaseModel):
    """An answer: `context[start:end] == text`; a no-answer result has text "" and start == end == 0."""

    text: str
    start: int
    end: int
    score: float
    no_answer: bool
    null_score_diff: float


class Metrics:
    """Prometheus metrics of one app, in their own registry (several apps may live in one process)."""

    def __init__(self, depth: Callable[[], float]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sparseqa_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "sparseqa_request_latency_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.batch_requests = Histogram(
            "sparseqa_batch_requests",
            "Requests (examples) per packed batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_windows = Histogram(
            "sparseqa_batch_windows", "Windows per packed batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.batch_tokens = Histogram(
            "sparseqa_batch_tokens",
            "Tokens per packed batch",
            buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384),
            registry=r,
        )
        self.queue_depth = Gauge("sparseqa_queue_depth", "Requests waiting for the batcher", registry=r)
        self.queue_depth.set_function(depth)

    def on_batch(self, jobs: int, windows: int, tokens: int) -> None:
        """Record one batch the worker ran."""
        self.batch_requests.observe(jobs)
        self.batch_windows.observe(windows)
        self.batch_tokens.observe(tokens)


class _MetricsMiddleware:
    """Pure ASGI: counts every response by status and times it (including 422s raised before the endpoint)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = {"code": 499}  # stays 499 (client closed request) when no response start was sent
        t0 = time.perf_counter()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            status["code"] = 500  # Starlette's outermost error middleware answers it
            raise
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


def create_app(engine: QAEngine, config: ServeConfig = ServeConfig()) -> FastAPI:
    """The app; its lifespan starts the batcher and, on shutdown, drains it."""
    batcher: Batcher
    metrics = Metrics(lambda: batcher.depth)
    batcher = Batcher(engine, config.batch, metrics.on_batch)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(batcher.close)

    app = FastAPI(
        title="SparseQA", summary="Extractive question answering over a ragged engine artifact", lifespan=lifespan
    )
    app.state.batcher, app.state.metrics, app.state.engine = batcher, metrics, engine
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    async def run(request: Request, items: Sequence[AnswerRequest]) -> list | Response:
        for i, it in enumerate(items):
            longest = max(len(it.question), len(it.context))
            if longest > config.max_context_chars:
                raise HTTPException(
                    413, f"item {i}: {longest} characters exceed --max-context-chars {config.max_context_chars}"
                )
        try:
            windows = await anyio.to_thread.run_sync(
                lambda: [engine.windows.windows(it.question, it.context) for it in items]
            )
        except (ValueError, TypeError) as e:  # e.g. a question with no tokens
            raise HTTPException(422, str(e)) from None
        jobs = [Job(ws) for ws in windows]
        try:
            batcher.submit(jobs)
        except QueueFull as e:
            raise HTTPException(503, str(e), headers={"Retry-After": str(config.retry_after_s)}) from None
        except Closed as e:
            raise HTTPException(503, str(e)) from None
        logits = await _results_unless_disconnected(request, batcher, jobs)
        if logits is None:
            return Response(status_code=499)  # nobody reads it
        return await anyio.to_thread.run_sync(
            lambda: [
                _json(
                    engine.decode_answers(
                        it.context, job.windows, s, e, it.top_k, it.max_answer_length, it.null_threshold
                    )
                )
                for it, job, (s, e) in zip(items, jobs, logits)
            ]
        )

    @app.post("/v1/answer", response_model=AnswerOut | list[AnswerOut])
    async def answer(request: Request, body: AnswerRequest):
        """Answer one question: the best answer, or a list of the `top_k` best when top_k > 1."""
        out = await run(request, [body])
        return out if isinstance(out, Response) else out[0]

    @app.post("/v1/answer_batch", response_model=list[AnswerOut | list[AnswerOut]])
    async def answer_batch(request: Request, body: list[AnswerRequest]):
        """Answer a list of questions, in order (at most --max-queue items)."""
        if len(body) > config.batch.max_queue:
            raise HTTPException(413, f"{len(body)} items exceed --max-queue {config.batch.max_queue}")
        return await run(request, body) if body else []

    @app.get("/healthz")
    async def healthz():
        """Readiness: 200 with the artifact's name, shape and backend while serving, 503 while draining."""
        cfg = engine.cfg
        body = {
            "status": "ok" if batcher.accepting else "draining",
            "artifact": engine.artifact.path.name,
            "architecture": cfg.architecture.value,
            "layers": len(cfg.heads),
            "hidden": cfg.hidden,
            "heads": list(cfg.heads),
            "ffn": list(cfg.ffn),
            "dtype": engine.artifact.dtype,
            "backend": engine.backend_name,
            "queue_depth": batcher.depth,
        }
        return JSONResponse(body, status_code=200 if batcher.accepting else 503)

    @app.get("/metrics")
    async def prometheus():
        """Prometheus text exposition."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _json(a: Answer | list[Answer]) -> dict | list[dict]:
    return [x.to_dict() for x in a] if isinstance(a, list) else a.to_dict()


async def _results_unless_disconnected(request: Request, batcher: Batcher, jobs: list[Job]) -> list | None:
    """The jobs' logits in order, or None (and the jobs cancelled) if the client disconnects first."""
    results = asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs))
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
        if results in done:
            return results.result()
        return None
    finally:  # also on cancellation of this task: queued jobs must not run for nobody
        gone.cancel()
        if not results.done():
            for job in jobs:
                batcher.cancel(job)
            results.cancel()


async def _disconnect(request: Request) -> None:
    """Returns once the client has gone (the body was already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
