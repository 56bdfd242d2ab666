"""What one process keeps after training students one after another: glibc's kept heap vs ``malloc_trim``.

Each variant runs in its own process (``--variant``): ``students`` times, load SmolLM2-135M-Instruct, compile its
training decoder (``--compile``), train ``steps`` bf16 steps of 4 × ``length`` tokens with fused AdamW, free it
(the compiled graphs released as the training stage does), then read the process's anonymous memory
(``RssAnon``). ``kept``: as glibc leaves it; ``trimmed``: after :func:`kd_lightning.memory.release_freed_memory`
(what every artifact build over 2 s now ends with). Ends with one JSON line; the ratio is kept / trimmed
anonymous memory after the last student, and the seconds are each variant's training time.

    python benchmarks/bench_memory.py [--students 3] [--steps 6] [--length 512] [--compile]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

JSON_KEYS = ("bench", "students", "steps", "length", "compiled", "kept", "trimmed", "kept_over_trimmed")
VARIANTS = ("kept", "trimmed")


def anonymous_gib() -> float:
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    from kd_lightning.memory import release_freed_memory
    from kd_lightning.models.forward import compile_for_training, release_compiled, target_position_logits
    from kd_lightning.models.loading import load_causal_lm

    torch.set_num_threads(2)
    after, seconds = [], []
    for student in range(args.students):
        torch.manual_seed(student)
        model = load_causal_lm("smollm2")
        model.train()
        if args.compile:
            compile_for_training(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        start = time.perf_counter()
        for _ in range(args.steps):
            ids = torch.randint(0, int(model.config.vocab_size), (4, args.length))
            positions = torch.ones_like(ids, dtype=torch.bool)
            positions[:, -1] = False
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = target_position_logits(model, ids, torch.ones_like(ids), positions)
            torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:].reshape(-1)).backward()
            optimizer.step()
            optimizer.zero_grad()
        seconds.append(round(time.perf_counter() - start, 1))
        release_compiled(model)
        del model, optimizer, logits
        if args.variant == "trimmed":
            release_freed_memory()
        else:
            gc.collect()
        after.append(round(anonymous_gib(), 3))
    return {"anonymous_gib_after_each": after, "train_seconds": seconds}


def main() -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from _isolated import parse_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--compile", action="store_true", help="compile each student's training decoder")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parse_args(parser, {"students": 2, "steps": 1, "length": 32})
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    import subprocess

    results = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--students", str(args.students),
                   "--steps", str(args.steps), "--length", str(args.length), *(["--compile"] if args.compile else [])]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{variant:8s} anonymous GiB after each student {results[variant]['anonymous_gib_after_each']}, "
              f"train s {results[variant]['train_seconds']}", flush=True)  # fmt: skip
    last = {v: results[v]["anonymous_gib_after_each"][-1] for v in VARIANTS}
    figures = {
        "bench": "memory kept after students freed in one process",
        "students": args.students,
        "steps": args.steps,
        "length": args.length,
        "compiled": bool(args.compile),
        "kept": results["kept"],
        "trimmed": results["trimmed"],
        "kept_over_trimmed": round(last["kept"] / last["trimmed"], 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
