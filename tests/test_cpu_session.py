"""scripts/cpu_session.sh: the stage plan sized to a measured step rate, the refusal where the required stages do not
fit, prerequisites, and that every stage it runs is a real scripts/reproduce_squad.sh stage (RATE skips the probe;
SESSION_DRY prints the commands instead of training)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("awk") is None, reason="needs bash, awk")


def _session(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "RUNS": str(tmp_path / "runs"), "RESULTS_DIR": str(tmp_path / "results" / "cpu-e1"), **env}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=full, timeout=60)


def _plan(stdout: str) -> dict[str, tuple[float, str]]:
    """{stage: (minutes, verdict)} from the plan's lines."""
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"^(\S+)\s+([\d.]+) min  (fits|skip|done|tight|REQUIRED, DOES NOT FIT)\s", line)
        if m:
            out[m[1]] = (float(m[2]), m[3])
    return out


def test_the_plan_fits_a_bf16_session_and_keeps_the_order(tmp_path: Path):
    r = _session(tmp_path, "plan", "150", RATE="0.9")  # the Xeon's rate: about 1.1 s per 32-window step
    assert r.returncode == 0, r.stderr
    plan = _plan(r.stdout)
    required = ["teacher", "teacher-sn", "eval-teacher-sn", "student-0.5", "eval-student-0.5", "bundle"]
    assert list(plan)[:6] == required and all(plan[s][1] == "fits" for s in required)
    # 4,463 + 107 steps at 1/0.9 s: 84.6 minutes; the whole required chain within the 150
    assert plan["teacher"][0] == pytest.approx(4570 / 0.9 / 60, abs=0.06)
    assert sum(plan[s][0] for s in required) <= 150
    # the 3.5x student does not fit after them, so its evaluation is skipped with it
    assert plan["student-0.75"][1] == "skip" and plan["eval-student-0.75"][1] == "skip"
    assert "plan: the required stages fit in 150 min" in r.stdout
    # more time: the optional stages join in order
    more = _plan(_session(tmp_path, "plan", "240", RATE="0.9").stdout)
    assert more["student-0.75"][1] == more["eval-student-0.75"][1] == "fits"


def test_a_cpu_without_native_bf16_is_refused_with_the_estimate(tmp_path: Path):
    r = _session(tmp_path, "plan", "150", RATE="0.3")  # the AVX2 EPYC: fp32, 0.27-0.31 steps/s
    assert r.returncode == 3
    assert _plan(r.stdout)["teacher"] == (pytest.approx(4570 / 0.3 / 60, abs=0.06), "REQUIRED, DOES NOT FIT")
    assert re.search(r"the required stages need \d+ min at 3\.333 s per teacher step, more than 150 min", r.stdout)
    r = _session(tmp_path, "run", "150", RATE="0.3", SESSION_DRY="1")
    assert r.returncode == 3 and "refusing to start (FORCE=1 runs anyway" in r.stderr
    assert 'advance 150" moves the required stages forward in this session' in r.stderr
    assert "would run" not in r.stdout


def test_the_dry_run_names_real_stages_in_order(tmp_path: Path):
    r = _session(tmp_path, "run", "150", RATE="0.9", SESSION_DRY="1", KD_2X="512", KD_N="16384")
    assert r.returncode == 0, r.stderr
    cmds = [line.removeprefix("would run: ") for line in r.stdout.splitlines() if line.startswith("would run: ")]
    # the six required stages, then the optional ones that still fit: 512 fewer distillation steps leave room for
    # the evaluation of teacher-cpu-e1 and the first cut towards 3.5x (0.375 of the FLOPs, which a later session's
    # 3.5x stage starts from) with its score, not for the 3.5x student itself nor the ablations
    assert len(cmds) == 9 and cmds[6].endswith("eval teacher-cpu-e1")
    assert "TAG=-of-teacher-cpu-e1-sn2-obs2L-kd512s16k-kd512" in cmds[7] and cmds[7].endswith("fast 0.25")
    assert cmds[8].endswith("eval fast-cpu-0.25-of-teacher-cpu-e1-sn2-obs2L-kd512s16k-kd512")
    stages = re.search(r'case "\$\{1:-all\}" in(.*?)esac', (ROOT / "scripts" / "reproduce_squad.sh").read_text(), re.S)
    known = set(re.findall(r"^\s+([a-z0-9-]+)\)", stages[1], re.M))
    for cmd in cmds:
        words = cmd.split()
        at = words.index("scripts/reproduce_squad.sh")
        assert all(re.fullmatch(r"[A-Z0-9_]+=\S+", w) for w in words[:at]), cmd  # env assignments only
        assert words[at + 1] in known, cmd
    # the knobs reach the commands and the run names
    assert "KD_STEPS=512 TAG=-teacher-cpu-e1-sn2-obs2L-kd512s16k" in cmds[3] and "KD_SAMPLES=16384" in cmds[3]
    assert cmds[4].endswith("eval fast-cpu-0.5-teacher-cpu-e1-sn2-obs2L-kd512s16k")
    assert cmds[5].startswith("BUNDLE_FROM=fast-cpu-0.5-teacher-cpu-e1-sn2-obs2L-kd512s16k ")
    assert "SWAP_LR=2e-5" in cmds[1] and cmds[1].endswith("teacher-swap teacher-cpu-e1 -sn2")
    times = (tmp_path / "runs" / "logs" / "session" / "times.tsv").read_text()
    assert "student-0.75\tskipped" in times and "eval-student-0.75\tskipped" in times
    assert "eval-nodistill-0.5\tskipped" in times and "student-0.4\tskipped" in times
    # with the time for all of it: the ablations of the 2x student's units, on the same teacher and budget
    r = _session(tmp_path, "run", "600", RATE="0.9", SESSION_DRY="1")
    cmds = [line.removeprefix("would run: ") for line in r.stdout.splitlines() if line.startswith("would run: ")]
    assert len(cmds) == 23
    # the iterative 3.5x student: half of the 2x student's FLOPs, distilled from the -sn teacher, after the 2x one
    s2 = "teacher-cpu-e1-sn2-obs2L-kd1024s32k"
    it = [c for c in cmds if "KD_TEACHER=" in c and c.endswith(" fast 0.5")]
    assert len(it) == 1 and it[0].startswith(f"TEACHER_RUN=fast-cpu-0.5-{s2} KD_TEACHER=teacher-cpu-e1-sn2 ")
    assert it[0].endswith(f"TAG=-of-{s2} scripts/reproduce_squad.sh fast 0.5") and "KD_STEPS=2048" in it[0]
    assert cmds.index(it[0]) > next(
        i for i, c in enumerate(cmds) if c.endswith(f"TAG=-{s2} scripts/reproduce_squad.sh fast 0.5")
    )
    assert f"scripts/reproduce_squad.sh eval fast-cpu-0.5-of-{s2}" in cmds
    # and the student at exactly 3.5x in a third gradual cut: 25% of the 2x student's FLOPs (1,024 steps), then 25.34%
    # of that one's (2,048 steps), both distilled from the -sn teacher, each named after the run it was cut from
    s375 = f"fast-cpu-0.25-of-{s2}-kd1024"
    cut = [c for c in cmds if "KD_TEACHER=" in c and c.endswith(" fast 0.25")]
    assert len(cut) == 1 and cut[0].startswith(f"TEACHER_RUN=fast-cpu-0.5-{s2} KD_TEACHER=teacher-cpu-e1-sn2 ")
    assert cut[0].endswith(f"TAG=-of-{s2}-kd1024 scripts/reproduce_squad.sh fast 0.25") and "KD_STEPS=1024" in cut[0]
    x35 = [c for c in cmds if "KD_TEACHER=" in c and c.endswith(" fast 0.2534")]
    assert len(x35) == 1 and x35[0].startswith(f"TEACHER_RUN={s375} KD_TEACHER=teacher-cpu-e1-sn2 ")
    assert x35[0].endswith(f"TAG=-of-{s375}-kd2048 scripts/reproduce_squad.sh fast 0.2534")
    assert "KD_STEPS=2048 KD_EVAL_EVERY=256" in x35[0] and cmds.index(cut[0]) < cmds.index(x35[0])
    assert f"scripts/reproduce_squad.sh eval fast-cpu-0.2534-of-{s375}-kd2048" in cmds
    assert f"scripts/reproduce_squad.sh eval {s375}" in cmds
    spec_env = "TEACHER_RUN=teacher-cpu-e1-sn2 REFIT=all FIT=ln KD_SAMPLES=32768 KD_STEPS=1024"
    tag = "TAG=-teacher-cpu-e1-sn2-L-kd1024s32k"
    assert f"{spec_env} {tag} scripts/reproduce_squad.sh fast-importance 0.5" in cmds
    assert f"{spec_env} {tag} scripts/reproduce_squad.sh fast-random 0.5" in cmds
    assert not any("SELECT" in c for c in cmds if " fast-" in c)  # --spec takes prune_fast's default selection


def test_a_longer_3_5x_distillation_is_named_by_its_steps(tmp_path: Path):
    r = _session(tmp_path, "run", "900", RATE="0.9", SESSION_DRY="1", KD_35X="4096")
    assert r.returncode == 0, r.stderr
    cmds = [line.removeprefix("would run: ") for line in r.stdout.splitlines() if line.startswith("would run: ")]
    run = "fast-cpu-0.5-of-teacher-cpu-e1-sn2-obs2L-kd1024s32k-kd4096"  # the default 2048 keeps the plain name
    it = [c for c in cmds if "KD_TEACHER=" in c and c.endswith(" fast 0.5")]
    assert len(it) == 1 and "KD_STEPS=4096 KD_EVAL_EVERY=512" in it[0]
    assert it[0].endswith(f"TAG=-{run.removeprefix('fast-cpu-0.5-')} scripts/reproduce_squad.sh fast 0.5")
    assert f"scripts/reproduce_squad.sh eval {run}" in cmds
    assert "TAG=-teacher-cpu-e1-sn2-obs2L-kd4096s32k scripts/reproduce_squad.sh fast 0.75" in " ".join(cmds)


def test_without_the_sn_round_the_students_are_cut_from_the_one_epoch_teacher(tmp_path: Path):
    r = _session(tmp_path, "run", "600", RATE="0.9", SESSION_DRY="1", SN_STEPS="0", KD_N="16384")
    assert r.returncode == 0, r.stderr
    cmds = [line.removeprefix("would run: ") for line in r.stdout.splitlines() if line.startswith("would run: ")]
    assert len(cmds) == 21  # no -sn round, and teacher-cpu-e1 scored once
    assert not any("teacher-swap" in c for c in cmds)
    assert [c for c in cmds if " eval teacher" in c] == ["scripts/reproduce_squad.sh eval teacher-cpu-e1"]
    s2 = "teacher-cpu-e1-obs2L-kd1024s16k"
    student = "TEACHER_RUN=teacher-cpu-e1 REFIT=all SELECT=obs SCORES=obs FIT=ln KD_SAMPLES=16384 KD_STEPS=1024"
    assert f"{student} TAG=-{s2} scripts/reproduce_squad.sh fast 0.5" in cmds
    assert f"BUNDLE_FROM=fast-cpu-0.5-{s2} scripts/reproduce_squad.sh bundle" in cmds
    assert cmds.index(f"scripts/reproduce_squad.sh eval fast-cpu-0.5-{s2}") > 1
    plan = _plan(r.stdout)
    assert "teacher-sn" not in plan and plan["eval-teacher-sn"][1] == "fits" and plan["student-0.5"][1] == "fits"


def test_a_second_epoch_comes_between_the_teacher_and_the_sn_round(tmp_path: Path):
    r = _session(tmp_path, "run", "600", RATE="0.9", SESSION_DRY="1", E2_STEPS="4463")
    assert r.returncode == 0, r.stderr
    cmds = [line.removeprefix("would run: ") for line in r.stdout.splitlines() if line.startswith("would run: ")]
    e2 = "E2_STEPS=4463 scripts/reproduce_squad.sh teacher-cpu-e2"
    sn = [c for c in cmds if "teacher-swap" in c]
    assert cmds[1] == e2 and len(sn) == 1 and sn[0].endswith("teacher-swap teacher-cpu-e2 -sn2")
    assert cmds.index(sn[0]) == 2
    assert "scripts/reproduce_squad.sh eval teacher-cpu-e2-sn2" in cmds
    assert "scripts/reproduce_squad.sh eval teacher-cpu-e2" in cmds  # the optional score of the round's base
    student = "TEACHER_RUN=teacher-cpu-e2-sn2 REFIT=all SELECT=obs SCORES=obs FIT=ln KD_SAMPLES=32768 KD_STEPS=1024"
    assert f"{student} TAG=-teacher-cpu-e2-sn2-obs2L-kd1024s32k scripts/reproduce_squad.sh fast 0.5" in cmds
    plan = _plan(r.stdout)
    assert plan["teacher-e2"] == (round((4463 + 107) / 0.9 / 60, 1), "fits")
    # costed from its newest checkpoint (RATE is steps per second); without E2_STEPS it is no stage at all
    step = tmp_path / "runs" / "teacher-cpu-e2" / "checkpoints" / "step-00004000"
    step.mkdir(parents=True)
    (step / "trainer.json").write_text("{}")
    plan = _plan(_session(tmp_path, "plan", "600", RATE="0.9", E2_STEPS="4463").stdout)
    assert plan["teacher-e2"][0] == round((463 + 107) / 0.9 / 60, 1)
    assert "teacher-e2" not in _plan(_session(tmp_path, "plan", "600", RATE="0.9").stdout)


def test_usage_errors(tmp_path: Path):
    r = _session(tmp_path, "train")
    assert r.returncode == 2 and "usage:" in r.stderr
    r = _session(tmp_path, "plan", "150", RATE="0")
    assert r.returncode == 1 and "probe failed" in r.stderr
    r = _session(tmp_path, "run", "150", RATE="0.9", PY=str(tmp_path / "no-python"))
    assert r.returncode == 2 and "run make install first" in r.stderr


def test_a_teacher_with_checkpoints_is_costed_from_where_it_resumes(tmp_path: Path):
    ckpts = tmp_path / "runs" / "teacher-cpu-e1" / "checkpoints"
    for step in ("step-00003950", "step-00004000"):
        (ckpts / step).mkdir(parents=True)
        (ckpts / step / "trainer.json").write_text("{}")
    (ckpts / "step-00004050.tmp").mkdir()  # an interrupted save: not a checkpoint
    (ckpts / "step-00004050.tmp" / "trainer.json").write_text("{}")
    (ckpts / "step-00004100").mkdir()  # no trainer.json yet: not complete
    plan = _plan(_session(tmp_path, "plan", "150", RATE="0.9").stdout)
    assert plan["teacher"][0] == pytest.approx((4463 - 4000 + 107) / 0.9 / 60, abs=0.06)
    assert plan["teacher-sn"][0] == pytest.approx((800 + 180) / 0.9 / 60, abs=0.06)  # no checkpoint of its own
    # with the teacher nearly done, the 3.5x student fits in the same 150 minutes
    assert plan["student-0.75"][1] == "fits"


@pytest.fixture(scope="module")
def session_outputs(tiny_bert, tmp_path_factory) -> Path:
    """What `run` leaves behind, in miniature: a dense teacher and a 2x bundle candidate (tiny artifacts) with
    engine.evaluate JSONs on synthetic data, under RUNS=root/runs and RESULTS_DIR=root/results/cpu-e1."""
    from engine.build_model import build
    from engine.evaluate import evaluate_artifact
    from engine.features import WindowSettings
    from tests.test_finetune import _squad

    root = tmp_path_factory.mktemp("session")
    settings = WindowSettings(96, 32, 24)
    spec = root / "spec.json"
    spec.write_text(json.dumps({"layers": [{"heads": [0], "ffn": [0, 1]}, {"heads": [], "ffn": []}, {"ffn": []}]}))
    data = root / "dev.json"
    data.write_text(json.dumps(_squad(5, 2)))
    res = root / "results" / "cpu-e1"
    res.mkdir(parents=True)
    # the group's teacher (teacher-cpu-e2-sn2) is scored, and so is the -sn teacher of the default chain here
    for name, kw in (
        ("teacher-cpu-e2-sn2", {}),
        ("teacher-cpu-e1-sn2", {}),
        (f"bundle-fast-cpu-0.5-{S2}", {"spec": spec}),
    ):
        art = build(tiny_bert, root / "runs" / "art" / name, settings=settings, null_threshold=-0.5, **kw)
        ev = evaluate_artifact(art, data, backend="torch", progress=False)
        (res / f"eval-{name}.json").write_text(json.dumps(ev))
    return root


S2 = "teacher-cpu-e1-sn2-obs2L-kd1024s32k"


def _with_scores(path: Path, has: float, stored_f1: float) -> None:
    """Give an eval JSON the dev scores a real run would have (the tiny models score near 0)."""
    ev = json.loads(path.read_text())
    ev["at_zero"]["HasAns_f1"] = has
    ev["at_stored_threshold"]["f1"] = stored_f1
    path.write_text(json.dumps(ev))


def test_promote_only_a_bundle_that_meets_every_target(session_outputs: Path, tiny_bert, tmp_path: Path):
    root = tmp_path / "s"
    shutil.copytree(session_outputs, root)
    models = tmp_path / "models"
    models.mkdir()
    env = {"RUNS": str(root / "runs"), "RESULTS_DIR": str(root / "results" / "cpu-e1"), "MODELS_DIR": str(models)}
    env["CARD_BASE"] = str(tiny_bert)

    def promote(*args: str) -> subprocess.CompletedProcess:
        full = {**os.environ, **env}
        return subprocess.run([str(SCRIPT), "promote", *args], capture_output=True, text=True, env=full, timeout=300)

    r = promote()
    assert r.returncode == 2 and "usage:" in r.stderr
    bundle_eval = root / "results" / "cpu-e1" / f"eval-bundle-fast-cpu-0.5-{S2}.json"
    r = promote("tiny-2x")  # the tiny model's own scores: far below 75 HasAns F1
    assert r.returncode == 1 and "misses a bundle target" in r.stderr and "bundle HasAns F1" in r.stderr
    assert list(models.iterdir()) == []
    _with_scores(bundle_eval, 74.9, 60.0)
    assert promote("tiny-2x").returncode == 1  # 0.1 short
    _with_scores(bundle_eval, 75.0, 52.07)
    r = promote("tiny-2x")  # the numbers are met, but a random tiny model does not answer make run's year sample
    assert r.returncode == 1 and "fails make run's samples" in r.stderr and "must answer '1066'" in r.stderr
    assert list(models.iterdir()) == []
    env["SAMPLE_CHECK"] = "true"  # stands in for a model that gets the samples right
    r = promote("tiny-2x")
    assert r.returncode == 0, r.stderr
    assert (models / "DEFAULT").read_text() == "tiny-2x\n"
    card = (models / "tiny-2x" / "MODEL_CARD.md").read_text()
    assert "TAG=-e1 scripts/reproduce_squad.sh teacher-cpu" in card and "teacher-swap teacher-cpu-e1 -sn2" in card
    assert "| this model, stored threshold | -0.50 |" in card
    assert (models / "tiny-2x" / "engine.json").is_file()
    r = promote("tiny-2x")  # never over an existing model
    assert r.returncode == 2 and "exists" in r.stderr
    (root / "runs" / "art" / f"bundle-fast-cpu-0.5-{S2}" / "engine.json").unlink()
    r = promote("other")
    assert r.returncode == 2 and "run the session's bundle stage first" in r.stderr


def test_outputs_already_there_are_not_redone(tmp_path: Path):
    runs, res = tmp_path / "runs", tmp_path / "results" / "cpu-e1"
    res.mkdir(parents=True)
    student = runs / f"fast-cpu-0.5-{S2}"
    student.mkdir(parents=True)
    (student / "metrics.json").write_text("{}")  # prune_fast finished it
    (res / "eval-teacher-cpu-e1-sn2.json").write_text("{}")  # scored, its run's weights gone or older
    stale = res / f"eval-fast-cpu-0.5-{S2}.json"
    stale.write_text("{}")
    os.utime(stale, (1_000_000, 1_000_000))
    (student / "model.safetensors").write_text("newer weights")  # the student changed after it was scored
    plan = _plan(_session(tmp_path, "plan", "150", RATE="0.9").stdout)
    assert plan["eval-teacher-sn"] == (0.0, "done") and plan["student-0.5"] == (0.0, "done")
    assert plan["eval-student-0.5"][1] == "fits" and plan["teacher"][1] == "fits"
    r = _session(tmp_path, "run", "150", RATE="0.9", SESSION_DRY="1")
    cmds = [line.removeprefix("would run: ") for line in r.stdout.splitlines() if line.startswith("would run: ")]
    assert not any(
        c.endswith(("eval teacher-cpu-e1-sn2", f"TAG=-{S2} scripts/reproduce_squad.sh fast 0.5")) for c in cmds
    )
    assert any(c.endswith(f"eval fast-cpu-0.5-{S2}") for c in cmds)
    assert "student-0.5\tdone earlier" in (runs / "logs" / "session" / "times.tsv").read_text()


@pytest.mark.parametrize("lengths", ["uniform", "squad"])
def test_the_step_probe_runs_and_reports_its_rate(tiny_bert, lengths):
    """scripts/gpu_probe.py on the CPU (what `plan` measures): the trainer's step on packed windows, clipped to the
    model's positions (the tiny checkpoint has fewer than 256)."""
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_probe.py"), str(tiny_bert), "--device", "cpu", "--steps", "3"]
    r = subprocess.run([*cmd, "--lengths", lengths], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["device"] == "cpu" and info["batch"] == 32 and info["lengths"] == lengths
    assert info["steps_per_s"] > 0


def test_a_plan_within_the_probes_error_still_runs(tmp_path: Path):
    """The probe ran 10-25% slower than the real steps the costs count: a required chain estimated up to SLACK (15%)
    over the budget runs, its last stages marked tight; beyond that it is refused."""
    r = _session(tmp_path, "plan", "150", RATE="0.8")  # 7,450 steps at 1.25 s: 155 minutes
    plan = _plan(r.stdout)
    assert r.returncode == 0 and "tight, run anyway" in r.stdout
    assert plan["eval-student-0.5"][1] == plan["bundle"][1] == "tight" and plan["student-0.5"][1] == "fits"
    assert plan["eval-teacher"][1] == "skip"
    assert _session(tmp_path, "plan", "150", RATE="0.7").returncode == 3  # 177 minutes
    assert _session(tmp_path, "plan", "150", RATE="0.7", SLACK="20").returncode == 0
    r = _session(tmp_path, "run", "150", RATE="0.8", SESSION_DRY="1")
    assert r.returncode == 0 and r.stdout.count("would run: ") == 6


FAKE_RUNNER = r"""#!/usr/bin/env bash
# a stand-in for scripts/reproduce_squad.sh: logs each stage; teacher-cpu trains "forever" in a child process like the
# real trainer, saving its state on SIGTERM (after a delay, which advance must wait for) and exiting 143
echo "$*" >> "$RUNS/stages.txt"
if [ "$1" = teacher-cpu ]; then
  "$PY" -c '
import os, signal, sys, time
def stop(signum, frame):
    time.sleep(1.0)
    d = os.path.join(os.environ["RUNS"], "teacher-cpu-e1", "checkpoints", "step-00000123")
    os.makedirs(d)
    open(os.path.join(d, "trainer.json"), "w").write("{}")
    print("[train] SIGTERM at step 123/4463: state saved", file=sys.stderr, flush=True)
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
time.sleep(120)
sys.exit(0)
'
fi
"""


def test_advance_stops_the_running_stage_at_the_limit_and_waits_for_its_save(tmp_path: Path):
    """On a CPU that cannot finish the chain: `advance` runs the required stages under the time left; at the limit the
    stage's whole process group (the stage script and its trainer) gets SIGTERM, and advance returns only after the
    trainer has saved, with nothing after it started."""
    import sys

    fake = tmp_path / "fake_reproduce.sh"
    fake.write_text(FAKE_RUNNER)
    fake.chmod(0o755)
    (tmp_path / "runs").mkdir()
    r = _session(tmp_path, "advance", "0.05", REPRODUCE=str(fake), PY=sys.executable)  # 3 s
    assert r.returncode == 0, r.stderr
    assert "teacher stopped at the 0.05-minute limit with its state saved" in r.stdout
    assert "SIGTERM at step 123/4463: state saved" in r.stdout  # the trainer's last line, so it had finished
    assert (tmp_path / "runs" / "teacher-cpu-e1" / "checkpoints" / "step-00000123" / "trainer.json").exists()
    assert (tmp_path / "runs" / "stages.txt").read_text().splitlines() == ["teacher-cpu"]
    times = (tmp_path / "runs" / "logs" / "session" / "times.tsv").read_text()
    assert re.search(r"^teacher\t\d+ s\texit 124\tadvance$", times, re.M), times


def test_advance_resumes_after_a_finished_teacher(tmp_path: Path):
    """A teacher with its final checkpoint and exported weights is done (in the plan as well); advance goes on with
    the next required stages only, the optional ones never."""
    run = tmp_path / "runs" / "teacher-cpu-e1"
    (run / "checkpoints" / "step-00004463").mkdir(parents=True)
    (run / "checkpoints" / "step-00004463" / "trainer.json").write_text("{}")
    plan = _plan(_session(tmp_path, "plan", "150", RATE="0.3").stdout)
    assert plan["teacher"] == (pytest.approx(107 / 0.3 / 60, abs=0.06), "fits")  # no weights yet: only its evaluation
    (run / "model.safetensors").write_text("weights")
    plan = _plan(_session(tmp_path, "plan", "150", RATE="0.3").stdout)
    assert plan["teacher"] == (0.0, "done")
    r = _session(tmp_path, "advance", "150", SESSION_DRY="1")
    assert r.returncode == 0, r.stderr
    assert "teacher\tdone earlier" in r.stdout
    cmds = [line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith("would run for at most")]
    stages = [c.split("reproduce_squad.sh ")[1] for c in cmds]
    assert stages == [
        "teacher-swap teacher-cpu-e1 -sn2",
        "eval teacher-cpu-e1-sn2",
        "fast 0.5",
        f"eval fast-cpu-0.5-{S2}",
        "bundle",
    ]


TIMED_RUNNER = r"""#!/usr/bin/env bash
# a stand-in for scripts/reproduce_squad.sh that records when each stage starts and ends; FAIL names one that fails
echo "start $(date +%s.%N) $*" >> "$RUNS/stages.txt"
sleep 0.4
echo "end $(date +%s.%N) $*" >> "$RUNS/stages.txt"
[ "$1" != "${FAIL:-none}" ]
"""


def _timed(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[tuple[str, float, str]]]:
    import sys

    fake = tmp_path / "timed_reproduce.sh"
    fake.write_text(TIMED_RUNNER)
    fake.chmod(0o755)
    (tmp_path / "runs").mkdir(exist_ok=True)
    r = _session(tmp_path, *args, REPRODUCE=str(fake), PY=sys.executable, **env)
    events = []
    for line in (tmp_path / "runs" / "stages.txt").read_text().splitlines():
        what, t, cmd = line.split(" ", 2)
        events.append((what, float(t), cmd))
    return r, events


def test_parallel_runs_each_stage_after_its_prerequisite_and_at_most_jobs_at_once(tmp_path: Path):
    """`parallel` (a GPU machine with many cores): every stage that ONLY picks, as soon as its prerequisite has
    finished, never more than JOBS at a time, and more than one at once where the table allows."""
    only = r"^(teacher|teacher-sn|eval-teacher-sn|student-0\.(5|75)|eval-student-0\.(5|75)|bundle|eval-teacher)$"
    r, ev = _timed(tmp_path, "parallel", "5", JOBS="2", ONLY=only)
    assert r.returncode == 0, r.stderr
    start = {cmd: t for what, t, cmd in ev if what == "start"}
    end = {cmd: t for what, t, cmd in ev if what == "end"}
    assert len(start) == len(end) == 9  # the nine stages ONLY names, each once
    sn, s2 = "teacher-swap teacher-cpu-e1 -sn2", f"eval fast-cpu-0.5-{S2}"
    assert end["teacher-cpu"] <= start[sn] and end["teacher-cpu"] <= start["eval teacher-cpu-e1"]
    for cmd in ("eval teacher-cpu-e1-sn2", "fast 0.5", "fast 0.75"):
        assert end[sn] <= start[cmd], cmd
    assert end["fast 0.5"] <= start[s2] and end["fast 0.5"] <= start["bundle"]
    running, most = 0, 0
    for what, _, _ in sorted(ev, key=lambda e: (e[1], e[0] == "start")):  # an end before a start at the same time
        running += 1 if what == "start" else -1
        most = max(most, running)
    assert most == 2
    times = (tmp_path / "runs" / "logs" / "session" / "times.tsv").read_text()
    assert len(re.findall(r"\texit 0\tparallel$", times, re.M)) == 9
    assert "nodistill-0.5" not in times  # not picked by ONLY: neither run nor listed


def test_parallel_skips_what_follows_a_failed_stage_and_fails(tmp_path: Path):
    r, ev = _timed(tmp_path, "parallel", "5", JOBS="3", ONLY=r"^(teacher|teacher-sn|eval-teacher-sn|eval-teacher)$",
                   FAIL="teacher-swap")  # fmt: skip
    assert r.returncode == 1 and "stage teacher-sn failed" in r.stderr
    started = [cmd for what, _, cmd in ev if what == "start"]
    assert sorted(started) == sorted(["teacher-cpu", "teacher-swap teacher-cpu-e1 -sn2", "eval teacher-cpu-e1"])
    assert "eval-teacher-sn\tskipped\tafter teacher-sn" in r.stdout


EDITING_RUNNER = r"""#!/usr/bin/env bash
# a stand-in for scripts/reproduce_squad.sh that edits the running session script, as a developer might mid-chain:
# a line added at its top shifts every byte bash has not read yet
echo "$*" >> "$RUNS/stages.txt"
if [ "$1" = teacher-cpu ]; then
  { echo "# a comment added while the chain ran"; cat "$SESSION_COPY"; } > "$SESSION_COPY.new"
  cat "$SESSION_COPY.new" > "$SESSION_COPY"  # in place, as an editor saves: same inode, new bytes
fi
"""


@pytest.mark.parametrize("name", ["cpu_session.sh", "reproduce_squad.sh", "gpu_v3.sh"])
def test_a_script_edited_while_it_runs_finishes_cleanly(tmp_path: Path, name: str):
    """bash reads a script as it executes it: after the dispatch returns it reads on at its old byte offset, which an
    edit made meanwhile has moved (an hours-long session once ended in a syntax error that way). Each long-running
    script exits on the dispatch's own line, so nothing after it is read: here a copy of cpu_session.sh is edited by
    its stage and still ends with status 0 and no stray command; the other two scripts end the same way."""
    import sys

    text = (ROOT / "scripts" / name).read_text()
    last = text.rstrip("\n").splitlines()[-1]
    assert re.match(r"^esac; exit\b", last), f"{name} must end with its dispatch and exit on the same line: {last!r}"
    if name != "cpu_session.sh":
        return
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    copy = repo / "scripts" / name
    copy.write_text(text)
    copy.chmod(0o755)
    fake = tmp_path / "editing_reproduce.sh"
    fake.write_text(EDITING_RUNNER)
    fake.chmod(0o755)
    (tmp_path / "runs").mkdir()
    full = {
        **os.environ,
        "RUNS": str(tmp_path / "runs"),
        "RESULTS_DIR": str(tmp_path / "results" / "cpu-e1"),
        "REPRODUCE": str(fake),
        "PY": sys.executable,
        "SESSION_COPY": str(copy),
        "ONLY": "^teacher$",
        "JOBS": "1",
    }
    r = subprocess.run([str(copy), "parallel", "1"], capture_output=True, text=True, env=full, timeout=60)
    assert (tmp_path / "runs" / "stages.txt").read_text().splitlines() == ["teacher-cpu"]
    assert copy.read_text().startswith("# a comment added while the chain ran\n")  # the edit happened mid-run
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert "syntax error" not in r.stderr and "command not found" not in r.stderr, r.stderr
