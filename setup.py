"""Packaging; the native part (engine._C, libqaengine) is built by the CMake project in CMakeLists.txt.

Metadata lives in pyproject.toml. The build hands engine._C to CMake (Ninja, build dir build/native, so `make test`
can run ctest there) and copies the module into place, also for editable installs. The C++ backend is optional: when
the toolchain or a dependency is missing, or the native build fails, a one-line notice is printed and the
pure-Python package is installed anyway.
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


class CMakeExtension(Extension):
    """An extension whose sources CMake builds (no setuptools compilation)."""

    def __init__(self, name: str):
        super().__init__(name, sources=[], optional=True)


def _notice(reason: str) -> None:
    print(f"notice: C++ backend (engine._C) not built: {reason}; installing the pure-Python package", file=sys.stderr)


class CMakeBuild(build_ext):
    """Configure and build the CMake project in build/native, then put engine._C where setuptools expects it."""

    def run(self) -> None:
        if shutil.which("cmake") is None:
            _notice("cmake not found (run scripts/install-system-deps.sh)")
            return
        try:
            import torch.utils  # noqa: F401  (CMake finds Torch through it)
        except ImportError:
            _notice("torch is not importable")
            return
        try:
            super().run()
        except (subprocess.CalledProcessError, OSError) as e:
            _notice(str(e).splitlines()[-1] if str(e) else type(e).__name__)

    def build_extension(self, ext: Extension) -> None:
        import torch.utils

        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        if (BUILD_DIR / "CMakeCache.txt").exists() and generator and not (BUILD_DIR / "build.ninja").exists():
            generator = []  # keep the generator an earlier configure chose
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(BUILD_DIR), *generator,
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
                result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
                if result.returncode != 0:
                    raise OSError(f"`{' '.join(cmd[:2])}` failed (see {log.relative_to(ROOT)})")
        built = sorted((BUILD_DIR / "python" / "engine").glob("_C*.so"))
        if not built:
            raise OSError(f"CMake did not produce engine/_C*.so (see {log.relative_to(ROOT)})")
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], dest)


setup(ext_modules=[CMakeExtension("engine._C")], cmdclass={"build_ext": CMakeBuild})
