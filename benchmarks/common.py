"""What every benchmark script shares: the machine's description and load.

Scripts run as ``python benchmarks/<name>.py`` put this folder first on
``sys.path``, so ``import common`` finds this module.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time


def add_measurement_options(parser, unit: str) -> None:
    """--repeat, --max-load, --max-wait and --json, which the Ray benchmarks share; `unit` names
    what waits for a quiet machine ("run", "repetition")."""
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; figures are medians (default 3)")
    parser.add_argument("--max-load", type=float, default=1.5,
                        help=f"wait (up to --max-wait s) for the 1-minute load to fall below this before each {unit}")
    parser.add_argument("--max-wait", type=float, default=300)
    parser.add_argument("--json", default=None, help="also write every measurement to this JSON file")


def load1() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, max_wait: float) -> float:
    """Wait (up to max_wait s) for the 1-minute load to fall below max_load; return it."""
    deadline = time.time() + max_wait
    while load1() >= max_load and time.time() < deadline:
        print(f"  load {load1():.2f} >= {max_load}: waiting", flush=True)
        time.sleep(20)
    return load1()


def _first_field(path: str, prefix: str) -> str | None:
    with contextlib.suppress(OSError), open(path) as fh:
        for line in fh:
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    return None


def machine(*packages: str) -> dict:
    """CPU, cores, RAM and Python, plus the versions of the named packages
    (``"tensorflow"``, ``"ray"``, ``"pillow"`` also gives libjpeg-turbo, ...)."""
    import importlib

    mem = _first_field("/proc/meminfo", "MemTotal")
    info = {
        "nproc": os.cpu_count(),
        "cpu": _first_field("/proc/cpuinfo", "model name") or "?",
        "ram": f"{int(mem.split()[0]) / 1024 / 1024:.1f} GiB" if mem else "?",
        "python": platform.python_version(),
    }
    for name in packages:
        module = importlib.import_module("PIL" if name == "pillow" else name)
        info[name] = module.__version__
        if name == "pillow":
            from PIL import features

            info["libjpeg_turbo"] = features.version("libjpeg_turbo") or "no"
    return info
