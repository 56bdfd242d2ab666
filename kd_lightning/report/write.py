"""Writing a report: ``report.md`` (table and plots), ``runs.csv`` and PNGs; the ``kdl report`` command."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kd_lightning.atomic import atomic_write_text
from kd_lightning.report.runs import (
    ANY,
    METRICS,
    ReportError,
    Run,
    collect_runs,
    markdown_table,
    swept_settings,
)

DESCRIPTION = "kdl report <folder>...: a sweep's runs as one markdown table and PNG plots."


def plot_metric(runs: Sequence[Run], setting: str, metric: str, path: Path) -> bool:
    """``metric`` against ``setting``: one line per run label and value of the other swept settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [s for s in swept_settings(runs) if s != setting]
    lines: dict[str, list[tuple[Any, float]]] = defaultdict(list)
    flat: dict[str, float] = {}
    independent: set[str] = set()  # references that depend on no swept setting (SFT, one-hot labels)
    for run in runs:
        if metric not in run.metrics:
            continue
        x = run.settings.get(setting)
        rest = ", ".join(
            f"{o}={run.settings.get(o)}" for o in others if run.settings.get(o) not in (None, ANY)
        )
        name = run.label + (f" ({rest})" if rest else "")
        if x == ANY or x is None:
            flat[name] = run.metrics[metric]
            if not rest:
                independent.add(name)
        elif isinstance(x, (int, float)):
            lines[name].append((x, run.metrics[metric]))
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    # runs that do not depend on the setting are horizontal references, drawn when they are near the
    # swept lines (a far-off reference, e.g. the proxy, would flatten the comparison) and named otherwise
    ys = [p[1] for pts in lines.values() for p in pts]
    span = max(max(ys) - min(ys), 1e-3 * max(abs(max(ys)), 1.0))
    in_range = {name for name, value in flat.items() if min(ys) - 2 * span <= value <= max(ys) + 2 * span}
    near = in_range if len(in_range) <= 5 else in_range & independent  # too many: keep the independent
    off_axis = []
    for i, (name, value) in enumerate(sorted(flat.items())):
        if name in near:
            ax.axhline(
                value,
                linestyle="--",
                linewidth=1,
                color=f"C{(len(lines) + i) % 10}",
                label=f"{name} (any {setting})",
            )
        elif name not in in_range:
            off_axis.append(f"{name}: {value:.4g}")
    if off_axis:
        ax.set_title("off the axis: " + "; ".join(off_axis), fontsize=7)
    values = sorted({p[0] for pts in lines.values() for p in pts})
    if len(values) > 2 and values[0] > 0 and values[-1] / values[0] >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.set_xlabel(setting)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_curves(runs: Sequence[Run], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_curves = [r for r in runs if len(r.curve) > 1]
    if not with_curves:
        return False
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for run in sorted(with_curves, key=lambda r: r.label):
        rest = ", ".join(f"{k}={v}" for k, v in run.settings.items() if v != ANY)
        ax.plot(*zip(*run.curve), label=run.label + (f" ({rest})" if rest else ""), linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train/loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(runs: Sequence[Run], out_dir: Path, metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """``report.md`` (table + plots), ``runs.csv`` and one PNG per (swept setting, metric)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in (metrics or METRICS) if any(m in r.metrics for r in runs)]
    plots = []
    for setting in swept_settings(runs):
        values = {
            json.dumps(r.settings.get(setting)) for r in runs if r.settings.get(setting) not in (None, ANY)
        }
        if len(values) < 2:  # one value: nothing to plot against
            continue
        for metric in metrics:
            path = out_dir / f"{metric}_vs_{setting}.png"
            if plot_metric(runs, setting, metric, path):
                plots.append(path.name)
    if plot_curves(runs, out_dir / "loss_curves.png"):
        plots.append("loss_curves.png")
    table = markdown_table(runs)
    lines = [f"# Report: {len(runs)} runs", "", table, ""]
    lines += [f"![{name}]({name})" for name in plots]
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    buffer = io.StringIO()
    columns = ["run", *swept_settings(runs), *metrics]
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for run in runs:
        writer.writerow(
            {
                "run": run.label,
                **{c: run.settings.get(c, "") for c in columns[1:] if c not in metrics},
                **{m: run.metrics.get(m, "") for m in metrics},
            }
        )
    atomic_write_text(out_dir / "runs.csv", buffer.getvalue())
    return {"table": table, "plots": plots, "runs": len(runs), "out_dir": str(out_dir)}


def main(argv: Sequence[str]) -> None:
    """``kdl report FOLDER... [--out DIR] [--metric NAME ...]``."""
    parser = argparse.ArgumentParser(prog="kdl report", description=DESCRIPTION)
    parser.add_argument("folders", nargs="+", help="multirun folders, job folders or wandb folders")
    parser.add_argument("--out", help="where report.md and the PNGs go (default: <first folder>/report)")
    parser.add_argument("--metric", action="append", help=f"plot only these (of {', '.join(METRICS)})")
    args = parser.parse_args(list(argv))
    try:
        runs = collect_runs(args.folders)
        out = Path(args.out) if args.out else Path(args.folders[0]) / "report"
        result = write_report(runs, out, args.metric)
    except ReportError as err:
        print(f"kdl report: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(result["table"])
    print(f"\n{len(result['plots'])} plots and report.md in {result['out_dir']}")
