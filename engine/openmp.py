"""A bounded OpenMP spin for every user of the engine, set before torch loads libgomp (docs/CPP.md "Threads").

After each parallel region, libgomp (torch's intra-op threads, oneDNN's) keeps its idle threads spinning for
GOMP_SPINCOUNT iterations: 300,000 by default, measured at about 8 ms of CPU on the 2-core reference machine. Any
thread pool that runs next in the process (the C++ engine's, tokenizers' Rayon pool) then shares its cores with a
spinner: a pruned MiniLM forward at (1,128) right after one torch matmul took 2.3x as long as alone.

`import engine` therefore sets GOMP_SPINCOUNT=10000 (about 0.3 ms, the C++ pool's own spin) when libgomp is not loaded
yet and the user has set neither GOMP_SPINCOUNT nor OMP_WAIT_POLICY. The trade-off: torch regions more than ~0.3 ms
apart wake their threads through a futex (tens of microseconds) instead of finding them spinning; the regions inside
one torch op or model forward follow each other closer than that. When libgomp is already loaded (torch imported
first), the setting cannot take effect; the cpp backend then releases the calling thread's OpenMP team before each
multi-threaded forward instead (`engine._C.set_release_caller_team`). A user's own setting always wins.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "10000"
USER_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def libgomp_loaded() -> bool:
    """True when libgomp is mapped into this process (it then read its environment already)."""
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:  # no procfs: torch is what loads libgomp here
        return "torch" in sys.modules


def configure(environ: os._Environ | dict = os.environ) -> str:
    """Apply the default; returns 'user' (the user set a spin policy: untouched), 'bounded' (GOMP_SPINCOUNT set
    before libgomp loads) or 'late' (libgomp loaded with its defaults: the cpp backend releases teams instead)."""
    if any(v in environ for v in USER_VARIABLES):
        return "user"
    if libgomp_loaded():
        return "late"
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return "bounded"


STATE = configure()
