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


def measure(step: Callable[[], float], repeats: int = 2, device: str = "cpu") -> dict:
    """Best time of ``repeats`` calls of ``step`` (returning the loss) and the peak memory they added (MiB):
    the process's peak RSS on a CPU, the allocator's peak on a GPU (timed after a device sync)."""
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = step()  # float(loss) syncs the device
        times.append(time.perf_counter() - start)
    if cuda:
        after = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"loss": value, "seconds": min(times), "peak_added_mib": after - before}


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
