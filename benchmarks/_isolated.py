"""Shared by the benchmarks: the smoke size every script takes, and (for the loss benchmarks) a loss step's
time and the peak memory it adds, one variant per process.

Peak RSS only grows within a process, so each variant runs in a fresh child (the script re-invoked with
``--variant``) and reports one JSON line back. ``--smoke`` runs a script at a size that takes seconds, with
the same JSON keys (``JSON_KEYS`` in each script): the test suite runs every script so.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any


def parse_args(parser: argparse.ArgumentParser, smoke: Mapping[str, Any]) -> argparse.Namespace:
    """Parse the command line; with ``--smoke``, the ``smoke`` sizes replace the defaults (not what was given)."""
    parser.add_argument("--smoke", action="store_true", help="a size that runs in seconds (the test suite's)")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args()
    return args


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
