"""The teacher generations of RESULTS.md's accuracy sections: each group's results folder, heading, note, ablation
pairs and teacher (bench.accuracy_tables renders them, bench.accuracy_rows fills them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    """One teacher generation: its eval files' folder (inside bench/results), its section and its ablation pairs."""

    name: str  # key in accuracy.json
    folder: str  # "." = the results folder itself
    heading: str
    note: str
    ablations: tuple[tuple[str, str, str], ...] = ()  # (what it shows, SparseQA's run, the ablation at its budget)
    empty: str | None = None  # shown when the group has no rows; None leaves the section out
    ablation_heading: str = "What distillation and L0 gates buy (same target, same budget)"
    teacher: str | None = None  # the group's teacher row; None: its shortest eval-teacher* name (the fp32 build)


# every teacher generation, newest first; the accuracy targets are judged on one group (targets_group)
GROUPS = (
    Group(
        "cpu-e1",
        "cpu-e1",
        "## Teacher-cpu-e2-sn2 (the 2-core recipe) and its students",
        "`scripts/cpu_session.sh` (`run` in one 2-core session with native bf16, `advance` across sessions without it, "
        "or `parallel` on one GPU: `scripts/gpu_v3.sh e1`; each row's JSON names the device and backend): "
        "`teacher-cpu-e1` (one epoch, 4,463 steps of 32 windows), "
        "its question-edit round `teacher-cpu-e1-sn2` (800 steps, lr 2e-5: 30% question swaps, 10% antonym edits, "
        "10% negations; docs/TRAINING.md), the group's first teacher, and its students: `fast-cpu-T-teacher-cpu-e1-sn2-"
        "obs2L-kdNs32k` is engine.prune_fast at T of the encoder FLOPs removed (`--refit all --select obs --scores obs "
        "--fit-error ln`) then N steps of distillation on 32,768 fresh windows (the teacher's logits cached by the "
        "engine on a CPU, the teacher live on a GPU); `bundle-RUN` is RUN as the bundled "
        "default model would ship (fp16 weights, int8 word embeddings); `-ce`: the same structure distilled with the "
        "span CE alone (`--distill-weight 0`); `importance-cpu-0.5-*`, `random-cpu-0.5-*`: the units of "
        "engine.make_spec `--by importance` / `--by random` at 50%, then the same refit and distillation "
        "(`prune_fast --spec`); `fast-cpu-0.5-of-RUN`: half of the 2x student RUN's FLOPs cut again (0.25 of the "
        "teacher's) and distilled from the teacher (`prune_fast --distill-teacher`: iterative pruning; 2,048 steps, "
        "or N with a `-kdN` suffix; `-kdNh1`: N steps with the layers tied to the teacher's too, "
        "`--distill-hidden-weight 1`, the teacher live; `-kdNsMk`: N steps on M x 1,024 windows instead of 32,768); "
        "`fast-cpu-0.44-of-RUN-kdN`: 44% of RUN's FLOPs cut instead (0.280 of the teacher's at 384 tokens: 3.57x "
        "fewer, just past the issue's 3.5x), the same distillation for N steps; `-kdNw05`: half the loss on the "
        "train labels (`--distill-weight 0.5`); `fast-cpu-0.25-of-RUN-kdN`: 25% of RUN's FLOPs cut (0.375 of the "
        "teacher's) with N steps, and `fast-cpu-0.2534-of-fast-cpu-0.25-of-RUN-kdN-kdM` 25.34% of that one's (0.280 "
        "again) with M: the same 3.57x in three gradual cuts instead of two (`seed1`: the last cut repeated with "
        "`--seed 1`); "
        "`fast-cpu-T-teacher-cpu-e1-obs2L-kdNs16k`: the same recipe cut from `teacher-cpu-e1` itself, with no "
        "question-edit round (`SN_STEPS=0`), on 16,384 windows, and judged against that teacher (its bundle build "
        "meets the four numbers of the bundle targets but, at its stored threshold of -9.07, abstains on `make run`'s "
        "answerable samples, so it is not the bundled default: docs/TRAINING.md). `teacher-cpu-e2`: teacher-cpu-e1 "
        "trained a second epoch (`scripts/reproduce_squad.sh teacher-cpu-e2`: lr 5e-5 decayed to 0 over 4,463 steps), "
        "`teacher-cpu-e2-sn2` the same question-edit round from it (`E2_STEPS=4463`), the group's teacher now, and "
        "`*-teacher-cpu-e2-sn2-*` its students; `minilm-l6-squad2-obs-2.0x`, the bundled default model, is "
        "`bundle-fast-cpu-0.5-teacher-cpu-e2-sn2-obs2L-kd1024s32k` as committed under models/. Scored on "
        "the 2-core CPU (cpp backend), or on the GPU where the chain ran there.",
        (
            (
                "distillation vs span CE alone (same units, 1,024 steps)",
                "fast-cpu-0.5-teacher-cpu-e1-sn2-obs2L-kd1024s32k",
                "fast-cpu-0.5-teacher-cpu-e1-sn2-obs2L-kd1024s32k-ce",
            ),
            (
                "prune_fast's units vs importance scores (same refit and distillation)",
                "fast-cpu-0.5-teacher-cpu-e2-sn2-obs2L-kd1024s32k",
                "importance-cpu-0.5-teacher-cpu-e2-sn2-L-kd1024s32k",
            ),
            (
                "prune_fast's units vs random heads and units (same refit and distillation)",
                "fast-cpu-0.5-teacher-cpu-e2-sn2-obs2L-kd1024s32k",
                "random-cpu-0.5-teacher-cpu-e2-sn2-L-kd1024s32k",
            ),
            (
                "3.5x: cut from the 2x student (iterative) vs cut once (2,048 steps each)",
                "fast-cpu-0.5-of-teacher-cpu-e1-sn2-obs2L-kd2048s32k",
                "fast-cpu-0.75-teacher-cpu-e1-sn2-obs2L-kd2048s32k",
            ),
        ),
        ablation_heading="What prune_fast's choice of units and distillation buy (same teacher, target and budget)",
        teacher="teacher-cpu-e2-sn2",
    ),
    Group(
        "current",
        ".",
        "## Accuracy on the complete official SQuAD 2.0 dev set",
        "Runs named `l0-v3-T` are SparseQA's method (L0 gates with distillation from `teacher-v3`, trained on a GPU; T"
        " = fraction of encoder FLOPs removed); `-fp16`: fp16 weights with int8 word embeddings (the bundled default "
        "model's precision); `+400`: one more 400-step distillation round; `-cpu`: trained on the 2-core CPU (400 gate"
        " + 400 fine-tune steps) instead of the GPU; `-x1.5`: pruned to a measured 1.5x speedup over the teacher at "
        "(8,384) on the cpp engine instead of a FLOP target; `fast-v3-*`: post-training pruning of `teacher-v3` with "
        "no retraining (`engine.prune_fast`; `-search`, `-rearrange`: its model after that stage, with no tuned null "
        "threshold, so its stored threshold is 0); `importance-noft-v3-0.4`: Michel et al.'s importance cut at 40% "
        "with no fine-tuning at all; `nodistill-v3`, `random-v3`, `importance-v3` are the ablations at the same target"
        " and budget; `minilm-l6-squad2-l0-2.1x` was the bundled default model until `minilm-l6-squad2-obs-2.0x` "
        "(`l0-v3-0.52+400` in fp16 with int8 word embeddings)."
        " `teacher-v3c` is `teacher-v3` continued on the CPU for 1,200 steps with its learning rate "
        "decayed to 0, and `teacher-v3s` is `teacher-v3c` continued for 800 steps with question-swap negatives "
        "(docs/TRAINING.md); `+v3c`, `+v3s`: that round was distilled from `teacher-v3c` or `teacher-v3s` (with "
        "`+v3s`, on the same swap negatives). Each row's losses are against the teacher it was last distilled from "
        "(the 'against' column: `teacher-v3` for the rows without `+v3c`/`+v3s`; the later teachers against "
        "`teacher-v3`). The bundle and the `-cpu`, `+v3c`, `+v3s`, `fast-v3-*`, `importance-noft` and "
        "`teacher-v3c`/`teacher-v3s` rows were scored on the 2-core CPU (cpp backend); the other v3 rows on the H200 "
        "(torch backend, fp32 artifacts). The ms and speedup columns come from `make bench-students` (each model in "
        "turn, 3 rounds at (8,384); two builds of the dense teacher differ by 3% there); a latency target is checked "
        "with the interleaved, paired `python -m engine.latency --check` instead (docs/PRUNING.md).",
        (
            ("distillation (same L0 gates, hard labels only)", "l0-v3-0.52", "nodistill-v3-0.52"),
            ("L0 gates vs random heads/units", "l0-v3-0.52", "random-v3-0.52"),
            ("L0 gates vs importance scores", "l0-v3-0.52", "importance-v3-0.52"),
            (
                "Fisher search + rearrangement + tuning vs importance, no retraining (40%)",
                "fast-v3-0.4",
                "importance-noft-v3-0.4",
            ),
            ("L0 + distillation vs post-training, same 1.5x latency target", "l0-v3-x1.5-cpu", "fast-v3-x1.5"),
        ),
        "No current-teacher rows yet: evaluate `teacher-v3` and its students into `bench/results/eval-NAME.json` "
        "(`scripts/reproduce_squad.sh eval NAME`), then run `python -m bench.accuracy_rows`.",
    ),
    Group(
        "cpu",
        "cpu",
        "## Teacher-cpu (one 2-core session) and post-training pruning from it: the refit and the "
        "reconstruction-aware choices",
        "A dense teacher one 2-core session trains (`GEN=cpu scripts/reproduce_squad.sh teacher-cpu`: 1,600 steps of "
        "32 windows of teacher v2's data, 48 minutes), used to measure engine.prune_fast's refit stage after teacher "
        "v3's checkpoints were lost with the machine that held them (docs/PRUNING.md). `fast-cpu-T-R`: post-training "
        "pruning of `teacher-cpu` at T of the encoder FLOPs removed, `--refit R` (`none` = Kwon et al. as published; "
        "`all`, the default, refits every kept output projection and the QA head; `layers`, `head`: one of the two; "
        "`obs`: `--select obs`, heads and units chosen by the refit's own error; `obs2`: `--scores obs --select obs`, "
        "the search's allocation priced by that error too; `obs2L`: `obs2` with `--fit-error ln`, the selection's and "
        "refit's errors weighted as after each sublayer's LayerNorm; `allL`: `all` with `--fit-error ln`). `-kdN`: "
        "then N steps of 32 windows of distillation from the teacher on the same 2,048 windows (`--distill-steps N`: "
        "biases and LayerNorms only; `all`: every weight, lr 5e-5; `w1`: KD loss alone, no span CE), i.e. a brief "
        "retraining, not post-training alone; `-kdNsMk`: N steps (every weight, KD alone, lr 5e-5) on M x 1,024 "
        "windows of the same shuffle (`--distill-samples`). Rows up to the `-kd64`/`-kd96` ones store the held-out "
        "best-F1 threshold (`--threshold-rule heldout`); the `-kdNsMk` rows store the threshold at which the student "
        "abstains on as many held-out questions as the teacher (`teacher-rate`, now the default), and "
        "`-thrheldout` is the same model with the held-out argmax instead. `teacher-cpu-e1`: the teacher-cpu recipe "
        "for one whole epoch (4,463 steps, `TEACHER_CPU_STEPS=4463 TAG=-e1`), and `teacher-cpu-e1-s`: that teacher "
        "continued for 800 steps with question-swap negatives (`teacher-swap teacher-cpu-e1`; docs/TRAINING.md), "
        "`-sn` the same with 30% swaps, 10% antonym edits and 10% negations; their losses are against teacher-cpu, "
        "so negative numbers are gains. Scored on the 2-core CPU (cpp backend, "
        "fp32).",
        (
            (
                "refit of every projection and the head vs Kwon et al. as published (30%)",
                "fast-cpu-0.3-all",
                "fast-cpu-0.3-none",
            ),
            ("refit vs Kwon et al. as published (40%)", "fast-cpu-0.4-all", "fast-cpu-0.4-none"),
            ("refit of the projections vs of the QA head alone (30%)", "fast-cpu-0.3-layers", "fast-cpu-0.3-head"),
            (
                "units chosen by the refit's error vs rearrangement + tuning + refit (30%)",
                "fast-cpu-0.3-obs",
                "fast-cpu-0.3-all",
            ),
            (
                "units chosen by the refit's error vs rearrangement + tuning + refit (40%)",
                "fast-cpu-0.4-obs",
                "fast-cpu-0.4-all",
            ),
            (
                "search on the refit's error vs on diagonal Fisher, both --select obs (30%)",
                "fast-cpu-0.3-obs2",
                "fast-cpu-0.3-obs",
            ),
            (
                "search on the refit's error vs on diagonal Fisher, both --select obs (40%)",
                "fast-cpu-0.4-obs2",
                "fast-cpu-0.4-obs",
            ),
            (
                "errors weighted as after LayerNorm vs pre-LayerNorm, refit all (30%)",
                "fast-cpu-0.3-allL",
                "fast-cpu-0.3-all",
            ),
            (
                "errors weighted as after LayerNorm vs pre-LayerNorm, both --scores obs --select obs (30%)",
                "fast-cpu-0.3-obs2L",
                "fast-cpu-0.3-obs2",
            ),
            (
                "errors weighted as after LayerNorm vs pre-LayerNorm, both --scores obs --select obs (40%)",
                "fast-cpu-0.4-obs2L",
                "fast-cpu-0.4-obs2",
            ),
            (
                "64 steps of distillation of the biases and LayerNorms vs none, same pruned model (30%)",
                "fast-cpu-0.3-obs2L-kd64",
                "fast-cpu-0.3-obs2L",
            ),
            (
                "64 steps of distillation of every weight vs of the biases and LayerNorms (30%)",
                "fast-cpu-0.3-obs2L-kd64all",
                "fast-cpu-0.3-obs2L-kd64",
            ),
            (
                "distillation on the teacher's distributions alone vs with the span CE (w 0.9), every weight (30%)",
                "fast-cpu-0.3-obs2L-kd64allw1",
                "fast-cpu-0.3-obs2L-kd64all",
            ),
            (
                "64 steps of distillation (every weight, KD alone) vs none, after the default stages (30%)",
                "fast-cpu-0.3-all-kd64allw1",
                "fast-cpu-0.3-all",
            ),
            (
                "--fit-error ln + 64 steps of distillation vs neither, both --scores obs --select obs, 1.5x target",
                "fast-cpu-x1.5-obs2L-kd64allw1",
                "fast-cpu-x1.5-obs2",
            ),
            (
                "--fit-error ln + 64 steps of distillation vs neither, both --scores obs --select obs (50%)",
                "fast-cpu-0.5-obs2L-kd64allw1",
                "fast-cpu-0.5-obs2",
            ),
            (
                "64 steps of distillation (every weight, KD alone) vs none, same pruned model (40%)",
                "fast-cpu-0.4-obs2L-kd64allw1",
                "fast-cpu-0.4-obs2L",
            ),
            (
                "256 steps of distillation on 8,192 windows vs 64 on the 2,048 pruning windows, same pruned model and "
                "threshold rule (50%)",
                "fast-cpu-0.5-obs2L-kd256s8k-thrheldout",
                "fast-cpu-0.5-obs2L-kd64allw1",
            ),
            (
                "stored threshold by the teacher's abstention rate vs the held-out best-F1 argmax, same model (50%)",
                "fast-cpu-0.5-obs2L-kd256s8k",
                "fast-cpu-0.5-obs2L-kd256s8k-thrheldout",
            ),
            (
                "stored threshold by the teacher's abstention rate vs the held-out best-F1 argmax, same model (75%)",
                "fast-cpu-0.75-obs2L-kd256s8k",
                "fast-cpu-0.75-obs2L-kd256s8k-thrheldout",
            ),
            (
                "512 steps of distillation on 16,384 windows vs 256 on 8,192, same pruned model (50%)",
                "fast-cpu-0.5-obs2L-kd512s16k",
                "fast-cpu-0.5-obs2L-kd256s8k",
            ),
            (
                "1,024 steps of distillation on 32,768 windows vs 512 on 16,384, same pruned model (50%)",
                "fast-cpu-0.5-obs2L-kd1024s32k",
                "fast-cpu-0.5-obs2L-kd512s16k",
            ),
            (
                "512 steps of distillation on 16,384 windows vs 256 on 8,192, same pruned model (75%)",
                "fast-cpu-0.75-obs2L-kd512s16k",
                "fast-cpu-0.75-obs2L-kd256s8k",
            ),
            (
                "1,024 steps of distillation on 32,768 windows vs 512 on 16,384, same pruned model (75%)",
                "fast-cpu-0.75-obs2L-kd1024s32k",
                "fast-cpu-0.75-obs2L-kd512s16k",
            ),
        ),
        ablation_heading="What the refit and the reconstruction-aware choices buy (same teacher and Fisher windows)",
    ),
    Group(
        "v2",
        "v2",
        "## Teacher v2 (every train file, 2,200 steps of 32 windows on 2 CPU cores)",
        "**Superseded** by the current teacher above; kept for the record (`bench/results/v2/`). Runs named `l0-v2-T` "
        "are SparseQA's method (L0 gates with distillation from `teacher-v2`, T = fraction of encoder FLOPs removed); "
        "`-fp16`: fp16 weights with int8 word embeddings (the bundled default model's precision); `fast-v2-*`: "
        "post-training pruning of `teacher-v2` with no retraining (`engine.prune_fast`); `nodistill-v2`, `random-v2`, "
        "`importance-v2` are the ablations at the same target and budget.",
        (
            ("distillation (same L0 gates, hard labels only)", "l0-v2-0.52", "nodistill-v2-0.52"),
            ("L0 gates vs random heads/units", "l0-v2-0.52", "random-v2-0.52"),
            ("L0 gates vs importance scores", "l0-v2-0.52", "importance-v2-0.52"),
        ),
    ),
    Group(
        "previous",
        "previous",
        "## Previous teacher (MiniLM fine-tuned on 25k windows, 1,600 steps)",
        "**Superseded** by the current teacher above; kept for the record (`bench/results/previous/`). Runs named "
        "`l0-T` are SparseQA's method (L0 gates with distillation from `teacher-minilm`, T = fraction of encoder "
        "FLOPs removed, 400 gate + 200 fine-tune steps unless the name says `-ft1000` or `+1000`).",
        (
            ("distillation (same L0 gates, hard labels only)", "l0-0.5", "nodistill-0.5"),
            ("L0 gates vs random heads/units (200 fine-tune steps)", "l0-0.5", "random-0.5"),
            ("L0 gates vs importance scores (1000 fine-tune steps)", "l0-0.5-ft1000", "importance-0.5-ft1000"),
            ("L0 gates vs importance scores (+1000 more)", "l0-0.5-ft1000+1000", "importance-0.5-ft1000+1000"),
        ),
    ),
)
GROUP = {g.name: g for g in GROUPS}
