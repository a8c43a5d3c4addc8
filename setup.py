"""Packaging; the native part (engine._C, libqaengine) is built by the CMake project in CMakeLists.txt.

Metadata lives in pyproject.toml. The build hands engine._C to CMake (Ninja, build dir build/native, so `make test`
can run ctest there) and copies the module into place, also for editable installs. The C++ backend is optional, but
never silently absent: when the toolchain or a dependency is missing, or the native build fails, one warning names
what failed and the command that shows why, the same text goes to build/native/NATIVE-NOT-BUILT.txt (pip hides a
build's output; `make install` prints that file), and the pure-Python package is installed (an engine/_C*.so
left by an earlier build is removed, so it cannot serve stale code).
SPARSEQA_REQUIRE_NATIVE=1 (set by CI) turns the warning into a failed install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BUILD_DIR = ROOT / "build" / "native"
INPLACE_DIR = ROOT / "engine"  # where editable installs keep engine/_C*.so
REQUIRE_NATIVE_ENV = "SPARSEQA_REQUIRE_NATIVE"
NOT_BUILT_FILE = "NATIVE-NOT-BUILT.txt"  # in BUILD_DIR; present exactly when the last build attempt failed


class NativeBuildError(OSError):
    """The native build failed; `see` is the command that shows why."""

    def __init__(self, what: str, see: str):
        super().__init__(what)
        self.what, self.see = what, see


class CMakeExtension(Extension):
    """An extension whose sources CMake builds (no setuptools compilation)."""

    def __init__(self, name: str):
        super().__init__(name, sources=[], optional=True)


def _shown(path: Path) -> str:
    """`path` relative to the repository root when it lies inside it (shorter, copy-pasteable from the root)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def native_not_built(what: str, see: str) -> None:
    """Report a failed native build: one warning on stderr and in BUILD_DIR; raise if SPARSEQA_REQUIRE_NATIVE=1."""
    failed = f"the C++ backend (engine._C) was NOT built: {what}. See why: {see}."
    if os.environ.get(REQUIRE_NATIVE_ENV) == "1":
        raise SystemExit(f"error: {failed} ({REQUIRE_NATIVE_ENV}=1; unset it to install the pure-Python package)")
    message = (
        f"WARNING: {failed} Installing the pure-Python package without backend='cpp'; "
        f"set {REQUIRE_NATIVE_ENV}=1 to fail instead."
    )
    print(message, file=sys.stderr)
    for stale in INPLACE_DIR.glob("_C*.so"):  # an earlier build's module would serve code these sources replaced
        stale.unlink()
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    (BUILD_DIR / NOT_BUILT_FILE).write_text(message + "\n")


class CMakeBuild(build_ext):
    """Configure and build the CMake project in build/native, then put engine._C where setuptools expects it."""

    def run(self) -> None:
        (BUILD_DIR / NOT_BUILT_FILE).unlink(missing_ok=True)
        if shutil.which("cmake") is None:
            native_not_built("cmake is not on PATH", "which cmake (apt-get install cmake, or pip install cmake)")
            return
        try:
            import torch.utils  # noqa: F401  (CMake finds Torch through it)
        except ImportError as e:
            native_not_built(f"torch is not importable ({e})", f'{sys.executable} -c "import torch"')
            return
        try:
            super().run()
        except NativeBuildError as e:
            native_not_built(e.what, e.see)
        except OSError as e:  # e.g. a compiler or ninja that cannot be started
            what = str(e).splitlines()[-1] if str(e) else type(e).__name__
            native_not_built(what, "python setup.py build_ext --inplace")

    def build_extension(self, ext: Extension) -> None:
        import torch.utils

        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        if (BUILD_DIR / "CMakeCache.txt").exists() and generator and not (BUILD_DIR / "build.ninja").exists():
            generator = []  # keep the generator an earlier configure chose
        configure = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(BUILD_DIR),
            *generator,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        ]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
        log = BUILD_DIR / "setup-build.log"
        with open(log, "w") as out:
            for cmd in (configure, ["cmake", "--build", str(BUILD_DIR), "--parallel", jobs]):
                out.write("$ " + " ".join(cmd) + "\n")
                out.flush()
                result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
                if result.returncode != 0:
                    what = f"`{' '.join(cmd[:2])}` exited with {result.returncode}"
                    raise NativeBuildError(what, f"tail -n 50 {_shown(log)}")
        built = sorted((BUILD_DIR / "python" / "engine").glob("_C*.so"))
        if not built:
            raise NativeBuildError("CMake did not produce engine/_C*.so", f"tail -n 50 {_shown(log)}")
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], dest)


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import it
    setup(ext_modules=[CMakeExtension("engine._C")], cmdclass={"build_ext": CMakeBuild})
