"""`python -m engine.batch_qa --artifact A --input PAIRS.jsonl --output ANSWERS.jsonl`: QA over a corpus.

Input lines are `{"id", "question", "context"}`; each output line holds the answer fields plus the id. Valid lines
are cut into shards of `--shard-size` in input order; each finished shard is written atomically to
`OUTPUT.shards/NNNNN.jsonl`, and `--resume` skips the shards already there, so a crashed job never loses or
duplicates an id. Bad lines (not JSON, missing or mistyped fields, a repeated id, text the tokenizer cannot use)
go to the rejects file with their line number and do not stop the job. With `--ray`, shards run on Ray Data:
`map_batches` over an actor pool of `--workers` actors, each loading the engine once with `--threads` threads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from engine.manifest import ArtifactError

ANSWER_FIELDS = ("text", "start", "end", "score", "no_answer", "null_score_diff")


@dataclass(frozen=True)
class Row:
    """One valid input line."""

    line: int  # 1-based line number in the input
    id: str | int  # as given; ids are unique as strings
    question: str
    context: str


@dataclass(frozen=True)
class JobConfig:
    """What every worker needs to answer rows the same way."""

    artifact: str
    backend: str = "auto"
    threads: int | None = None
    batch_size: int = 32
    max_answer_length: int = 30


def read_rows(path: Path) -> tuple[list[Row], list[dict]]:
    """Valid rows in input order, and rejects `{"line", "error"}` for the others."""
    rows: list[Row] = []
    rejects: list[dict] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                rejects.append({"line": n, "error": f"not JSON: {e}"})
                continue
            err = _row_error(rec, seen)
            if err:
                rejects.append({"line": n, "error": err})
                continue
            seen[str(rec["id"])] = n
            rows.append(Row(n, rec["id"], rec["question"], rec["context"]))
    return rows, rejects


def _row_error(rec: object, seen: dict[str, int]) -> str | None:
    if not isinstance(rec, dict):
        return f"expected an object with id, question, context, got {type(rec).__name__}"
    missing = [k for k in ("id", "question", "context") if k not in rec]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):
        return f"id must be a string or an integer, got {type(rec['id']).__name__}"
    for k in ("question", "context"):
        if not isinstance(rec[k], str) or not rec[k].strip():
            return f"{k} must be a non-empty string"
    if str(rec["id"]) in seen:
        return f"duplicate id {rec['id']!r} (first on line {seen[str(rec['id'])]})"
    return None


def answer_rows(engine, rows: list[dict], config: JobConfig) -> list[dict]:
    """Answer rows `{"line", "id", "question", "context"}` in one `answer_batch`; on a bad pair, retry one by one
    so only that row fails. Each result has the id and line, and either the answer fields or `error`."""
    pairs = [(r["question"], r["context"]) for r in rows]
    try:
        answers = engine.answer_batch(pairs, config.batch_size, max_answer_length=config.max_answer_length)
    except (ValueError, TypeError):
        answers = []
        for q, c in pairs:
            try:
                answers.append(engine.answer(q, c, max_answer_length=config.max_answer_length))
            except (ValueError, TypeError) as e:
                answers.append(e)
    out = []
    for r, a in zip(rows, answers):
        base = {"id": r["id"], "line": int(r["line"])}
        out.append({**base, "error": str(a)} if isinstance(a, Exception) else {**base, **a.to_dict()})
    return out


class ShardStore:
    """`OUTPUT.shards/`: one answers file per finished shard (written atomically), a manifest, rejects."""

    def __init__(self, output: Path, rows: list[Row], shard_size: int, resume: bool):
        self.output, self.dir, self.shard_size = output, output.with_name(output.name + ".shards"), shard_size
        self.n_shards = (len(rows) + shard_size - 1) // shard_size
        ids = hashlib.sha256(json.dumps([r.id for r in rows]).encode()).hexdigest()
        manifest = {"rows": len(rows), "shard_size": shard_size, "ids_sha256": ids}
        mpath = self.dir / "manifest.json"
        if self.dir.exists() and not resume:
            raise FileExistsError(f"{self.dir} exists from an earlier run: pass --resume to continue it, or delete it")
        if resume and mpath.is_file():
            old = json.loads(mpath.read_text())
            if old != manifest:
                raise ValueError(
                    f"{mpath} was made for other input or --shard-size ({old}); delete {self.dir} to start over"
                )
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(mpath, [json.dumps(manifest)])

    def path(self, shard: int) -> Path:
        """Answers file of one shard."""
        return self.dir / f"{shard:05d}.jsonl"

    def pending(self) -> list[int]:
        """Shards not written yet."""
        return [s for s in range(self.n_shards) if not self.path(s).is_file()]

    def write(self, shard: int, results: list[dict]) -> None:
        """Write one shard's results (answers, then its rejects) atomically; rows in input order."""
        results = sorted(results, key=lambda r: r["line"])
        bad = [{"line": r["line"], "id": r["id"], "error": r["error"]} for r in results if "error" in r]
        good = [{"id": r["id"], **{k: r[k] for k in ANSWER_FIELDS}} for r in results if "error" not in r]
        _write_atomic(self.dir / f"{shard:05d}.rejects.jsonl", [json.dumps(b, ensure_ascii=False) for b in bad])
        _write_atomic(self.path(shard), [json.dumps(g, ensure_ascii=False) for g in good])

    def finish(self, rejects: list[dict], rejects_path: Path) -> tuple[int, int]:
        """Concatenate the shards into the output and every reject into `rejects_path`; (answers, rejects)."""
        lines, bad = [], list(rejects)
        for s in range(self.n_shards):
            lines += self.path(s).read_text(encoding="utf-8").splitlines()
            bad += [json.loads(x) for x in (self.dir / f"{s:05d}.rejects.jsonl").read_text().splitlines()]
        _write_atomic(self.output, lines)
        _write_atomic(rejects_path, [json.dumps(b, ensure_ascii=False) for b in sorted(bad, key=lambda b: b["line"])])
        return len(lines), len(bad)


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shard_rows(rows: list[Row], store: ShardStore) -> Iterator[tuple[int, list[dict]]]:
    for s in store.pending():
        chunk = rows[s * store.shard_size : (s + 1) * store.shard_size]
        yield s, [{"line": r.line, "id": r.id, "question": r.question, "context": r.context} for r in chunk]


def run_local(rows: list[Row], store: ShardStore, config: JobConfig) -> None:
    """Answer every pending shard in this process."""
    from tqdm import tqdm

    from engine.qa import QAEngine

    engine = QAEngine.load(config.artifact, backend=config.backend, threads=config.threads)
    pending = store.pending()
    with tqdm(
        total=sum(min(store.shard_size, len(rows) - s * store.shard_size) for s in pending), unit="q", desc="batch_qa"
    ) as bar:
        for s, shard in _shard_rows(rows, store):
            for i in range(0, len(shard), config.batch_size):
                part = answer_rows(engine, shard[i : i + config.batch_size], config)
                shard[i : i + config.batch_size] = part
                bar.update(len(part))
            store.write(s, shard)


class _RayAnswerer:
    """Ray Data actor: loads the engine once, answers numpy batches of rows."""

    def __init__(self, config: JobConfig):
        from engine.qa import QAEngine

        self.config = config
        self.engine = QAEngine.load(config.artifact, backend=config.backend, threads=config.threads)

    def __call__(self, batch: dict) -> dict:
        rows = [json.loads(r) for r in batch["row"]]  # rows travel as JSON: ids may mix strings and integers
        out = answer_rows(self.engine, rows, self.config)
        return {"shard": batch["shard"], "result": [json.dumps(o, ensure_ascii=False) for o in out]}


def run_ray(rows: list[Row], store: ShardStore, config: JobConfig, address: str | None, workers: int) -> None:
    """Answer every pending shard on Ray Data (a local cluster when `address` is None); write each as it completes."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise RuntimeError("--ray needs Ray Data: pip install 'ray[data]' (pinned in requirements.txt)") from None
    from tqdm import tqdm

    threads = config.threads or 1
    started = not ray.is_initialized()
    if started:
        # A new local cluster is sized to the actors; an existing one keeps its own resources and settings.
        local = {
            "num_cpus": workers * threads,
            "include_dashboard": False,
            "runtime_env": {"env_vars": {"PYTHONPATH": _pythonpath()}},
        }
        ray.init(address=address, log_to_driver=False, **({} if address else local))
    try:
        items = [
            {"shard": s, "row": json.dumps(r, ensure_ascii=False)}
            for s, shard in _shard_rows(rows, store)
            for r in shard
        ]
        expected: dict[int, int] = {}
        for it in items:
            expected[it["shard"]] = expected.get(it["shard"], 0) + 1
        if not items:
            return
        ds = ray.data.from_items(items).map_batches(
            _RayAnswerer,
            fn_constructor_kwargs={"config": replace(config, threads=threads)},
            batch_size=config.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=threads,
        )
        done: dict[int, list[dict]] = {}
        with tqdm(total=len(items), unit="q", desc="batch_qa[ray]") as bar:
            for rec in ds.iter_rows():
                s = int(rec["shard"])
                done.setdefault(s, []).append(json.loads(rec["result"]))
                bar.update(1)
                if len(done[s]) == expected[s]:
                    store.write(s, done.pop(s))
    finally:
        if started:
            ray.shutdown()


def _pythonpath() -> str:
    """PYTHONPATH for local Ray workers: where this `engine` package lives, then the caller's path."""
    here = str(Path(__file__).resolve().parent.parent)
    return os.pathsep.join([here, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(
        prog="python -m engine.batch_qa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--artifact", required=True, help="engine artifact directory")
    p.add_argument("--input", required=True, type=Path, help="JSONL of {id, question, context}")
    p.add_argument("--output", required=True, type=Path, help="JSONL of answers, one per valid input id")
    p.add_argument("--rejects", type=Path, help="JSONL of {line, error} (default OUTPUT.rejects.jsonl)")
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray Data: a new local cluster without ADDRESS, else the cluster at ADDRESS",
    )
    p.add_argument("--workers", type=int, default=2, help="Ray actors (default %(default)s)")
    p.add_argument("--threads", type=int, help="engine threads per process / per Ray actor (Ray default 1)")
    p.add_argument("--batch-size", type=int, default=32, help="questions per answer_batch call (default %(default)s)")
    p.add_argument("--shard-size", type=int, default=1024, help="questions per output shard (default %(default)s)")
    p.add_argument("--max-answer-length", type=int, default=30, help="longest answer in tokens")
    p.add_argument("--backend", default="auto", help="auto, torch, cpp or triton")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run: skip shards already written")
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.shard_size < 1 or a.workers < 1:
        p.error("--batch-size, --shard-size and --workers must be >= 1")
    # An absolute artifact path: Ray workers do not share the driver's working directory.
    config = JobConfig(str(Path(a.artifact).resolve()), a.backend, a.threads, a.batch_size, a.max_answer_length)
    try:
        rows, rejects = read_rows(a.input)
        store = ShardStore(a.output, rows, a.shard_size, a.resume)
        if a.ray is None:
            run_local(rows, store, config)
        else:
            run_ray(rows, store, config, a.ray or None, a.workers)
        n_ok, n_bad = store.finish(rejects, a.rejects or a.output.with_name(a.output.name + ".rejects.jsonl"))
    except (ValueError, TypeError, OSError, RuntimeError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n_ok} answers to {a.output} ({n_bad} rejected lines)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
