"""Shared by the loss benchmarks: time a loss step and the peak memory it adds, one variant per process.

Peak RSS only grows within a process, so each variant runs in a fresh child (the script re-invoked with
``--variant``) and reports one JSON line back.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable


def measure(step: Callable[[], float], repeats: int = 2) -> dict:
    """Best time of ``repeats`` calls of ``step`` (returning the loss) and the peak RSS they added (MiB)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = step()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"loss": value, "seconds": min(times), "peak_added_mib": (after - before) / 1024}


def run_variants(script: str, variants: tuple[str, ...], args: list[str]) -> dict[str, dict]:
    """Run ``script --variant <v> *args`` for each variant in its own process; print and return results."""
    results = {}
    for variant in variants:
        cmd = [sys.executable, script, "--variant", variant, *args]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[variant] = r = json.loads(out)
        print(
            f"{variant:10s} loss {r['loss']:.6f}  {r['seconds']:.2f} s  peak +{r['peak_added_mib']:.0f} MiB",
            flush=True,
        )
    return results
