"""setup.py's native build: a failure warns loudly (or fails with SPARSEQA_REQUIRE_NATIVE=1), success copies _C.

CMake and the compiler are replaced by fakes, so nothing here rebuilds libqaengine; build/native is never touched.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from setuptools import Distribution

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def setup_py(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """setup.py imported as a module (its `setup()` call runs only as __main__), building into tmp_path/native."""
    spec = importlib.util.spec_from_file_location("sparseqa_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "BUILD_DIR", tmp_path / "native")
    monkeypatch.setattr(mod, "INPLACE_DIR", tmp_path / "inplace")
    monkeypatch.setattr(mod.shutil, "which", lambda name: f"/usr/bin/{name}")  # cmake and ninja "present"
    monkeypatch.delenv(mod.REQUIRE_NATIVE_ENV, raising=False)
    return mod


def _fake_cmake(returncodes: dict[str, int], so_dir: Path | None = None):
    """A stand-in for subprocess.run: `cmake -S` (configure) and `cmake --build` exit with the given codes."""

    def run(cmd, **kwargs):
        step = cmd[1]
        kwargs["stdout"].write(f"fake cmake {step}: exit {returncodes[step]}\n")
        if step == "--build" and returncodes[step] == 0 and so_dir is not None:
            so_dir.mkdir(parents=True, exist_ok=True)
            (so_dir / "_C.cpython-fake.so").write_bytes(b"not really a module")
        return subprocess.CompletedProcess(cmd, returncodes[step])

    return run


def _build(mod, tmp_path: Path) -> Path:
    """Run `build_ext` for engine._C with output under tmp_path; returns where the module would be copied."""
    dist = Distribution({"name": "sparseqa-test", "ext_modules": [mod.CMakeExtension("engine._C")]})
    cmd = mod.CMakeBuild(dist)
    cmd.build_lib = str(tmp_path / "lib")
    cmd.build_temp = str(tmp_path / "temp")
    cmd.ensure_finalized()
    cmd.run()
    return Path(cmd.get_ext_fullpath("engine._C"))


def test_failed_build_warns_once_and_records_it(setup_py, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(setup_py.subprocess, "run", _fake_cmake({"-S": 0, "--build": 2}))
    stale = tmp_path / "inplace" / "_C.cpython-old.so"
    stale.parent.mkdir()
    stale.write_bytes(b"an earlier build")
    dest = _build(setup_py, tmp_path)

    err = capsys.readouterr().err
    log = tmp_path / "native" / "setup-build.log"
    warning = (
        f"WARNING: the C++ backend (engine._C) was NOT built: `cmake --build` exited with 2. "
        f"See why: tail -n 50 {log}. Installing the pure-Python package without backend='cpp'; "
        f"set SPARSEQA_REQUIRE_NATIVE=1 to fail instead."
    )
    assert err.strip() == warning
    assert (tmp_path / "native" / setup_py.NOT_BUILT_FILE).read_text().strip() == warning
    assert "fake cmake --build: exit 2" in log.read_text()
    assert not dest.exists() and not stale.exists()


def test_require_native_turns_the_warning_into_a_failure(setup_py, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEQA_REQUIRE_NATIVE", "1")
    monkeypatch.setattr(setup_py.subprocess, "run", _fake_cmake({"-S": 1, "--build": 0}))
    with pytest.raises(SystemExit, match=r"NOT built: `cmake -S` exited with 1\. See why: tail .*; unset it to"):
        _build(setup_py, tmp_path)
    assert not (tmp_path / "native" / setup_py.NOT_BUILT_FILE).exists()


def test_missing_cmake_is_named(setup_py, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(setup_py.shutil, "which", lambda name: None)
    _build(setup_py, tmp_path)
    assert "NOT built: cmake is not on PATH. See why: which cmake" in capsys.readouterr().err


def test_success_copies_the_module_and_clears_an_old_warning(setup_py, tmp_path, monkeypatch, capsys):
    stale = tmp_path / "native" / setup_py.NOT_BUILT_FILE
    stale.parent.mkdir(parents=True)
    stale.write_text("WARNING: from an earlier failed build\n")
    so_dir = tmp_path / "native" / "python" / "engine"
    monkeypatch.setattr(setup_py.subprocess, "run", _fake_cmake({"-S": 0, "--build": 0}, so_dir))

    dest = _build(setup_py, tmp_path)
    assert dest.read_bytes() == b"not really a module"
    assert not stale.exists()
    assert "WARNING" not in capsys.readouterr().err


@pytest.mark.parametrize("require", ["", "1"])
def test_setup_py_as_a_script(tmp_path, require):
    """The real entry point (`python setup.py build_ext`, as pip's backend runs it) with no cmake on PATH."""
    (tmp_path / "setup.py").write_bytes((ROOT / "setup.py").read_bytes())
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin"), "SPARSEQA_REQUIRE_NATIVE": require}
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "engine._C) was NOT built: cmake is not on PATH" in proc.stderr
    assert (proc.returncode != 0) == (require == "1"), proc.stderr
    assert (tmp_path / "build" / "native" / "NATIVE-NOT-BUILT.txt").exists() == (require != "1")
