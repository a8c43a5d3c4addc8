"""The teacher-logit cache: a teacher's start/end logits for every training window, computed once by the engine.

Logit distillation needs the teacher's start/end logits for every training window. They do not change
during training (the teacher is frozen, in eval mode, and the windows are fixed), so they are computed
once with the fast inference engine (the cpp backend when built, any artifact precision) and stored with
safetensors, next to the run, keyed by the exact teacher weights, tokenizer, window settings, windows and
precision. Every student of that teacher reuses the file; a file whose key does not match is refused with a
message naming the mismatch, never silently used. The computation goes in chunks of consecutive windows,
each saved with its own key as it finishes: an interrupted one resumes at the first missing chunk, and a run
on more windows of the same shuffle reuses a smaller run's chunks.

Shapes: the cache holds `start`, `end` `[T_all]` (fp32) and `offsets` int64 `[N+1]` (window i's logits are
`[offsets[i]:offsets[i+1]]`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from engine.data.squad import TrainFeature
from engine.features import WindowSettings
from engine.packing import cu_seqlens_from_lengths
from engine.train.teacher import PRECISIONS, TeacherSource

CACHE_VERSION = "1"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
CHUNK_WINDOWS = 4096  # windows per resumable piece of a cache computation (about 100 s of MiniLM on 2 cores)


class StaleTeacherCacheError(ValueError):
    """A teacher-logit cache that does not belong to this teacher, tokenizer, window settings or windows."""


def _sha(chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def teacher_fingerprint(teacher_dir: Path) -> tuple[str, str]:
    """(sha256 of the teacher's config + weights, sha256 of its tokenizer files)."""
    weights = sorted(teacher_dir.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"teacher {teacher_dir} has no *.safetensors weights")

    def files(paths):
        for p in paths:
            yield p.name.encode() + b"\0"
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    yield block

    model = _sha(files([teacher_dir / "config.json", *weights]))
    tok = _sha(files([teacher_dir / n for n in _TOKENIZER_FILES if (teacher_dir / n).is_file()]))
    return model, tok


def windows_fingerprint(features: Sequence[TrainFeature]) -> str:
    """sha256 of every window's token ids and token types, in order."""

    def chunks():
        for f in features:
            yield np.asarray(f.input_ids, dtype=np.int64).tobytes() + b"|"
            yield np.asarray(f.token_type_ids, dtype=np.int8).tobytes() + b";"

    return _sha(chunks())


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached logits depend on; stored as the safetensors metadata and compared field by field."""

    teacher_sha: str
    tokenizer_sha: str
    settings: str  # WindowSettings as JSON
    windows_sha: str
    n_windows: int
    precision: str
    version: str = CACHE_VERSION

    @classmethod
    def of(
        cls, teacher_dir: Path, settings: WindowSettings, features: Sequence[TrainFeature], precision: str
    ) -> CacheKey:
        """The key for these inputs."""
        if precision not in PRECISIONS:
            raise ValueError(f"teacher precision must be one of {PRECISIONS}, got {precision!r}")
        model, tok = teacher_fingerprint(Path(teacher_dir))
        return cls(
            model,
            tok,
            json.dumps(asdict(settings), sort_keys=True),
            windows_fingerprint(features),
            len(features),
            precision,
        )

    @property
    def digest(self) -> str:
        """Short name for file names."""
        return _sha([json.dumps(asdict(self), sort_keys=True).encode()])[:16]

    def as_metadata(self) -> dict[str, str]:
        """String-valued safetensors metadata."""
        return {k: str(v) for k, v in asdict(self).items()}


class CachedTeacher(TeacherSource):
    """Teacher logits read from a validated cache file (all in memory: 8 bytes per training token)."""

    def __init__(self, path: Path, key: CacheKey):
        self.path = Path(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            want = key.as_metadata()
            wrong = [k for k in want if meta.get(k) != want[k]]
            if wrong:
                detail = ", ".join(f"{k}: cache has {meta.get(k, '<missing>')!r}, run needs {want[k]!r}" for k in wrong)
                raise StaleTeacherCacheError(
                    f"teacher-logit cache {path} was made for a different {' / '.join(wrong)} ({detail}); "
                    f"delete it (it is recomputed), point --teacher-cache elsewhere, or use --teacher-logits live"
                )
            self.start, self.end = f.get_tensor("start"), f.get_tensor("end")  # (T_all,) fp32
            self.offsets = f.get_tensor("offsets")  # (N+1,) int64
        if self.offsets.numel() != key.n_windows + 1 or int(self.offsets[-1]) != self.start.numel():
            raise StaleTeacherCacheError(
                f"teacher-logit cache {path} is malformed (offsets do not cover the logits); delete it to recompute"
            )

    def logits(self, indices, batch, want_hidden):
        if want_hidden:
            raise ValueError("cached teacher logits carry no hidden states; use --teacher-logits live")
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        lo, hi = self.offsets[idx], self.offsets[idx + 1]
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).to(device="cpu", dtype=torch.long)  # batch: any device
        if not torch.equal(hi - lo, lengths):
            raise StaleTeacherCacheError(f"teacher-logit cache {self.path}: window lengths differ from the batch's")
        rows = torch.cat([torch.arange(a, b) for a, b in zip(lo.tolist(), hi.tolist())])
        device = batch.input_ids.device  # the cache lives on the CPU; the batch may be on a GPU
        return self.start[rows].to(device), self.end[rows].to(device), None


@contextlib.contextmanager
def _teacher_runner(teacher_dir: Path, settings: WindowSettings, precision: str, backend: str, threads: int | None):
    """The teacher built as an engine artifact in `precision` (in a temporary directory) and loaded on the CPU."""
    from engine.artifact import load_artifact
    from engine.build_model import build
    from engine.runtime import create_backend

    with tempfile.TemporaryDirectory(prefix="sparseqa-teacher-") as tmp:
        art = load_artifact(build(teacher_dir, Path(tmp) / "artifact", dtype=precision, settings=settings))
        yield create_backend(backend, art, "cpu", threads)


@torch.inference_mode()
def _run_windows(runner, features: Sequence[TrainFeature], tokens_per_batch: int, bar) -> dict[str, torch.Tensor]:
    """{start, end, offsets} of `features` through `runner`, longest windows first (fewer, fuller batches)."""
    lengths = np.array([len(f.input_ids) for f in features])
    offsets = np.zeros(len(features) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    start = torch.empty(int(offsets[-1]), dtype=torch.float32)
    end = torch.empty_like(start)
    order = np.argsort(-lengths, kind="stable")
    i = 0
    while i < len(order):
        n = max(1, tokens_per_batch // int(lengths[order[i]]))
        idx = order[i : i + n]
        feats = [features[k] for k in idx]
        ids = torch.tensor([t for f in feats for t in f.input_ids], dtype=torch.long)
        types = torch.tensor([t for f in feats for t in f.token_type_ids], dtype=torch.long)
        lens = [len(f.input_ids) for f in feats]
        s, e = runner.forward_packed(ids, types, cu_seqlens_from_lengths(lens), max(lens))
        pos = 0
        for k, n_tok in zip(idx, lens):
            start[offsets[k] : offsets[k + 1]] = s[pos : pos + n_tok].float().cpu()
            end[offsets[k] : offsets[k + 1]] = e[pos : pos + n_tok].float().cpu()
            pos += n_tok
        bar.update(len(idx))
        i += n
    return {"start": start, "end": end, "offsets": torch.from_numpy(offsets)}


def _concat(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Consecutive windows' {start, end, offsets} joined into one."""
    base = np.cumsum([0] + [int(p["offsets"][-1]) for p in parts])
    offsets = torch.cat([parts[0]["offsets"][:1]] + [p["offsets"][1:] + int(b) for p, b in zip(parts, base)])
    return {
        "start": torch.cat([p["start"] for p in parts]),
        "end": torch.cat([p["end"] for p in parts]),
        "offsets": offsets,
    }


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write atomically: a file that exists is complete."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def _prefix_cache(cache_dir: Path, key: CacheKey, features: Sequence[TrainFeature]) -> CachedTeacher | None:
    """The finished cache in `cache_dir` of the most windows that are a proper prefix of `features` (the same teacher,
    tokenizer, settings and precision: a run on fewer windows of the same shuffle), or None."""
    best: tuple[CacheKey, Path] | None = None
    same = {k: v for k, v in key.as_metadata().items() if k not in ("windows_sha", "n_windows")}
    for path in sorted(cache_dir.glob("teacher-logits-*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            n = int(meta.get("n_windows", "0"))
        except Exception:  # not a readable cache: never a prefix
            continue
        if any(meta.get(k) != v for k, v in same.items()) or not 0 < n < len(features):
            continue
        if best and n <= best[0].n_windows:
            continue
        prefix_key = replace(key, windows_sha=windows_fingerprint(features[:n]), n_windows=n)
        if meta.get("windows_sha") == prefix_key.windows_sha:
            best = (prefix_key, path)
    if best is None:
        return None
    prefix_key, path = best
    try:
        return CachedTeacher(path, prefix_key)
    except Exception as e:
        print(f"teacher-logit cache {path} is not usable as a prefix ({e}); not reusing it", file=sys.stderr)
        return None


def compute_teacher_logits(
    teacher_dir: Path,
    settings: WindowSettings,
    features: Sequence[TrainFeature],
    precision: str,
    backend: str = "auto",
    threads: int | None = None,
    tokens_per_batch: int = 8192,
    progress: bool = True,
    chunks: Path | None = None,
    chunk_windows: int = CHUNK_WINDOWS,
    key: CacheKey | None = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """Run the teacher, built as an engine artifact in `precision`, over every window.

    With `chunks` (a directory) the windows go in consecutive chunks of `chunk_windows`, each saved there as soon
    as it is done, keyed like a cache of its own windows (`key`: this run's, whose windows fields each chunk
    replaces): an interrupted computation resumes at its first missing chunk, and a run whose windows begin with
    another's (the same shuffle, more of it) reuses that run's chunks, or the chunks its finished cache file (in
    the directory above `chunks`) covers whole.
    Returns ({start, end, offsets}, the backend that ran it; "" when every chunk was already on disk).
    """
    spans = [(0, len(features))]
    if chunks is not None:
        if chunk_windows < 1:
            raise ValueError(f"chunk_windows must be >= 1, got {chunk_windows}")
        key = key or CacheKey.of(Path(teacher_dir), settings, features, precision)
        chunks.mkdir(parents=True, exist_ok=True)
        spans = [(a, min(a + chunk_windows, len(features))) for a in range(0, len(features), chunk_windows)] or [(0, 0)]
    parts: list[dict[str, torch.Tensor] | None] = [None] * len(spans)
    paths: list[Path | None] = [None] * len(spans)
    keys: list[CacheKey | None] = [None] * len(spans)
    done = 0
    prefix = _prefix_cache(chunks.parent, key, features) if chunks is not None else None
    for j, (a, b) in enumerate(spans):
        if chunks is None:
            continue
        keys[j] = replace(key, windows_sha=windows_fingerprint(features[a:b]), n_windows=b - a)
        paths[j] = chunks / f"teacher-logits-{precision}-{keys[j].digest}.safetensors"
        if prefix is not None and b <= prefix.offsets.numel() - 1:  # inside a finished cache of fewer windows
            lo, hi = int(prefix.offsets[a]), int(prefix.offsets[b])
            offsets = prefix.offsets[a : b + 1] - lo
            parts[j] = {"start": prefix.start[lo:hi], "end": prefix.end[lo:hi], "offsets": offsets}
            done += b - a
        elif paths[j].is_file():
            try:
                got = CachedTeacher(paths[j], keys[j])
            except Exception as e:  # unreadable (a damaged disk: chunks are written atomically) or a stale key
                print(f"teacher-logit chunk {paths[j]} is not usable ({e}); recomputing it", file=sys.stderr)
                continue
            parts[j] = {"start": got.start, "end": got.end, "offsets": got.offsets}
            done += b - a
    name = ""
    with tqdm(
        total=len(features),
        initial=done,
        desc=f"teacher logits ({precision})",
        unit="win",
        disable=not progress,
        mininterval=5,
    ) as bar:
        if any(p is None for p in parts):
            with _teacher_runner(Path(teacher_dir), settings, precision, backend, threads) as runner:
                name = runner.name
                bar.set_description(f"teacher logits ({name}, {precision})")
                for j, (a, b) in enumerate(spans):
                    if parts[j] is None:
                        parts[j] = _run_windows(runner, features[a:b], tokens_per_batch, bar)
                        if paths[j] is not None:
                            _save(parts[j], paths[j], {**keys[j].as_metadata(), "backend": name})
    return (parts[0] if len(parts) == 1 else _concat(parts)), name


def cached_teacher(
    teacher_dir: Path,
    settings: WindowSettings,
    features: Sequence[TrainFeature],
    cache: Path,
    precision: str = "float32",
    backend: str = "auto",
    threads: int | None = None,
    progress: bool = True,
    chunk_windows: int = CHUNK_WINDOWS,
) -> CachedTeacher:
    """The teacher-logit cache for these windows: `cache` is a file, or a directory holding one file per key.

    A missing file is computed (and written atomically) chunk by chunk, the chunks kept in `chunks/` beside it:
    an interrupted computation resumes at its first missing chunk, and a larger run on the same shuffle reuses
    a smaller one's (`rm -r chunks` reclaims their space; only resumption and reuse need them). An existing file
    is validated against the key.
    """
    key = CacheKey.of(Path(teacher_dir), settings, features, precision)
    cache = Path(cache)
    path = cache if cache.suffix == ".safetensors" else cache / f"teacher-logits-{precision}-{key.digest}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, backend_name = compute_teacher_logits(
            Path(teacher_dir),
            settings,
            features,
            precision,
            backend,
            threads,
            progress=progress,
            chunks=path.parent / "chunks",
            chunk_windows=chunk_windows,
            key=key,
        )
        _save(tensors, path, {**key.as_metadata(), "backend": backend_name or "chunks"})
        print(
            f"teacher logits of {len(features)} windows ({backend_name or 'all chunks reused'}, {precision}) cached in "
            f"{path}",
            file=sys.stderr,
        )
    return CachedTeacher(path, key)
