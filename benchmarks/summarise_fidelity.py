"""Several ``kdl fidelity`` runs as one table: each estimate's KL, TV and top-k recall as mean ± std over seeds.

Each run folder (``outputs/fidelity/<time>``) holds ``fidelity.csv`` and the overrides it ran with
(``.hydra/overrides.yaml``). Runs are grouped by their overrides other than ``seed`` (e.g. ``alignment=lora``
against ``alignment=proxy_kd``), and within a group every estimate row is averaged over the group's seeds.
Prints a markdown table and ends with one JSON line.

    python benchmarks/summarise_fidelity.py outputs/fidelity/<time> outputs/fidelity/<time> ...
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import yaml

METRICS = ("kl", "kl_median", "tv", "topk_recall")


def run_settings(folder: Path) -> tuple[str, str]:
    """(the run's overrides other than seed, its seed) from its Hydra folder."""
    overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or []
    seed = next((o.split("=", 1)[1] for o in overrides if o.startswith("seed=")), "0")
    group = " ".join(o for o in overrides if not o.startswith("seed=") and not o.startswith("run_group="))
    return group, seed


def summarise(folders: list[Path]) -> list[dict]:
    """One row per (group, estimate): each metric's mean and std over the group's seeds."""
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    seeds: dict[tuple[str, str], list[str]] = {}
    for folder in folders:
        group, seed = run_settings(folder)
        with open(folder / "fidelity.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                key = (group, row["estimate"])
                seeds.setdefault(key, []).append(seed)
                for metric in METRICS:
                    values.setdefault(key, {}).setdefault(metric, []).append(float(row[metric]))
    rows = []
    for (group, estimate), metrics in values.items():
        row = {"group": group, "estimate": estimate, "seeds": sorted(set(seeds[(group, estimate)]))}
        for metric, xs in metrics.items():
            row[metric] = statistics.fmean(xs)
            row[f"{metric}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| runs | estimate | seeds | mean KL(true ‖ est.) | median KL | mean TV | top-k recall |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [f"{row[m]:.3f} ± {row[f'{m}_std']:.3f}" for m in METRICS]
        lines.append(
            f"| {row['group']} | {row['estimate']} | {len(row['seeds'])} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="kdl fidelity output folders")
    args = parser.parse_args()
    missing = [str(f) for f in args.folders if not (f / "fidelity.csv").is_file()]
    if missing:
        raise SystemExit(f"no fidelity.csv in {', '.join(missing)}: pass kdl fidelity's output folders")
    rows = summarise(args.folders)
    print(markdown(rows))
    print(json.dumps({"bench": "summarise_fidelity", "rows": rows}))


if __name__ == "__main__":
    main()
