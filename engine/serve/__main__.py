"""`python -m engine.serve ARTIFACT`: serve an engine artifact over HTTP with dynamic batching (docs/SERVING.md)."""

from __future__ import annotations

import argparse
import sys

from engine.manifest import ArtifactError


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: load the engine, then run uvicorn until SIGINT/SIGTERM (which drain in-flight work)."""
    from engine.serve.app import ServeConfig
    from engine.serve.batcher import BatchConfig

    d, b = ServeConfig(), BatchConfig()
    p = argparse.ArgumentParser(prog="python -m engine.serve", description=__doc__)
    p.add_argument("artifact", help="engine artifact directory (from python -m engine.build_model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", default="auto", help="auto, torch, cpp or triton")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="intra-op threads of the engine (default: the backend's)")
    knobs = [  # (flag, type, default, what it does)
        ("--max-batch-tokens", int, b.max_batch_tokens, "token budget of one packed forward"),
        ("--max-wait-ms", float, b.max_wait_ms, "longest an idle worker waits for more requests before a batch"),
        ("--max-queue", int, b.max_queue, "requests waiting at most; beyond it 503 with Retry-After"),
        ("--workers", int, b.workers, "batcher threads sharing the engine: one packs while another is in a forward"),
        ("--max-context-chars", int, d.max_context_chars, "longer contexts or questions get 413"),
    ]
    for flag, kind, default, what in knobs:
        p.add_argument(flag, type=kind, default=default, help=f"{what} (default %(default)s)")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    try:
        config = ServeConfig(
            BatchConfig(a.max_batch_tokens, a.max_wait_ms, a.max_queue, a.workers), a.max_context_chars
        )
        import uvicorn

        from engine.qa import QAEngine
        from engine.serve.app import create_app

        engine = QAEngine.load(a.artifact, device=a.device, backend=a.backend, threads=a.threads)
    except (ValueError, TypeError, OSError, RuntimeError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # uvicorn handles SIGTERM: stop accepting, let in-flight requests finish, then the app's lifespan drains the
    # batcher (timeout_graceful_shutdown None waits for every request).
    uvicorn.run(
        create_app(engine, config), host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=None
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
