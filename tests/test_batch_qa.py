"""engine.batch_qa: local mode against QAEngine.answer_batch, bad lines, resume after a simulated crash, Ray Data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import batch_qa
from engine.build_model import build
from engine.qa import QAEngine
from tests.conftest import SMALL_WINDOWS, qa_pairs


@pytest.fixture(scope="module")
def artifact(tiny_bert, tmp_path_factory) -> Path:
    return build(tiny_bert, tmp_path_factory.mktemp("bqa") / "a", settings=SMALL_WINDOWS)


BAD = [  # (line text, what the rejects file must say)
    ("{not json", "not JSON"),
    ('["a", "b"]', "expected an object"),
    ('{"id": "x1", "question": "who?"}', "missing field(s) context"),
    ('{"id": true, "question": "who?", "context": "the king"}', "id must be"),
    ('{"id": "x2", "question": 3, "context": "the king"}', "question must be a non-empty string"),
    ('{"id": "x3", "question": "who?", "context": "   "}', "context must be a non-empty string"),
    ('{"id": "q0", "question": "who?", "context": "the king"}', "duplicate id 'q0' (first on line 1)"),
]


def _write_input(path: Path, n: int) -> list[tuple]:
    """n good lines (ids q0.., one integer id) with the bad lines spread among them; the good rows."""
    good = [(f"q{i}" if i != 3 else 3, q, c) for i, (q, c) in enumerate(qa_pairs(n))]
    lines = [json.dumps({"id": i, "question": q, "context": c}) for i, q, c in good]
    for k, (bad, _) in enumerate(BAD):
        lines.insert(2 + 3 * k, bad)
    lines.insert(5, "")  # blank lines are skipped silently
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return good


def _args(artifact: Path, inp: Path, out: Path, *extra: str, shard_size: int) -> list[str]:
    """engine.batch_qa's command line on the torch backend, 4 questions a batch."""
    io = ["--artifact", str(artifact), "--input", str(inp), "--output", str(out)]
    return [*io, "--backend", "torch", *extra, "--batch-size", "4", "--shard-size", str(shard_size)]


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _check_against_engine(out: Path, good: list[tuple], artifact: Path) -> None:
    ref = QAEngine.load(artifact, backend="torch").answer_batch([(q, c) for _, q, c in good])
    got = _read(out)
    assert [g["id"] for g in got] == [i for i, _, _ in good]  # one line per id, input order, ids keep their type
    for g, a in zip(got, ref):
        assert {k: g[k] for k in ("text", "start", "end", "no_answer")} == {
            k: getattr(a, k) for k in ("text", "start", "end", "no_answer")
        }
        assert abs(g["score"] - a.score) < 1e-4 and abs(g["null_score_diff"] - a.null_score_diff) < 1e-4


def test_local_mode_and_bad_lines(artifact, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = _write_input(inp, 23)
    rc = batch_qa.main(_args(artifact, inp, out, shard_size=5))
    assert rc == 0
    _check_against_engine(out, good, artifact)
    rejects = _read(tmp_path / "out.jsonl.rejects.jsonl")
    assert len(rejects) == len(BAD)
    lines = inp.read_text(encoding="utf-8").split("\n")
    for r, (bad, why) in zip(rejects, BAD):
        assert lines[r["line"] - 1] == bad and why in r["error"]


def test_resume_after_crash(artifact, tmp_path, monkeypatch):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = _write_input(inp, 30)
    args = _args(artifact, inp, out, shard_size=7)

    class Crash(BaseException):
        pass

    real_write = batch_qa.ShardStore.write
    answered: list[int] = []
    real_rows = batch_qa.answer_rows

    def write_then_crash(self, shard, results):
        if shard == 2:
            real_write(self, shard, results[: len(results) // 2])  # a torn shard must not count as written...
            self.path(shard).unlink()
            raise Crash  # ...the process dies writing shard 2
        real_write(self, shard, results)

    monkeypatch.setattr(batch_qa.ShardStore, "write", write_then_crash)
    with pytest.raises(Crash):
        batch_qa.main(args)
    monkeypatch.setattr(batch_qa.ShardStore, "write", real_write)
    assert not out.exists() and len(list((tmp_path / "out.jsonl.shards").glob("000[0-9][0-9].jsonl"))) == 2

    assert batch_qa.main(args) == 2  # an earlier run's shards without --resume: refuse, name the fix
    assert batch_qa.main([*args[:-1], "9", "--resume"]) == 2  # other shard size: refuse

    monkeypatch.setattr(
        batch_qa, "answer_rows", lambda eng, rows, cfg: answered.extend([1] * len(rows)) or real_rows(eng, rows, cfg)
    )
    assert batch_qa.main([*args, "--resume"]) == 0
    assert len(answered) == len(good) - 2 * 7  # the two finished shards were skipped
    _check_against_engine(out, good, artifact)


def test_ray_local_cluster(artifact, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray[data]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": batch_qa._pythonpath()}},
        )
    except Exception as e:  # noqa: BLE001 - any failure to start a local cluster is a reason to skip
        pytest.skip(f"a local Ray cluster could not start here: {e}")
    try:
        inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        good = _write_input(inp, 20)
        rc = batch_qa.main(_args(artifact, inp, out, "--ray", "--workers", "2", "--threads", "1", shard_size=6))
        assert rc == 0
        _check_against_engine(out, good, artifact)
        assert len(_read(tmp_path / "out.jsonl.rejects.jsonl")) == len(BAD)
    finally:
        ray.shutdown()
