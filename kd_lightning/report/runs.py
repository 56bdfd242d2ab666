"""Reading a sweep's runs (Hydra job folders, wandb offline files) into :class:`Run` rows, and the table."""

from __future__ import annotations

import csv
import json
import struct
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METRICS = (
    "nll",
    "ppl",
    "token_accuracy",
    "ece",
    "rouge_l",
    "kl",
    "kl_median",
    "tv",
    "topk_recall",
)
ANY = "*"


@dataclass
class Run:
    """One row of a report: a label, the settings it was swept over, its figures, and its loss curve."""

    label: str
    settings: dict[str, Any]
    metrics: dict[str, float]
    source: str
    key: str = ""
    """Identity of what was measured (a student folder); rows with one key are merged."""
    curve: list[tuple[int, float]] = field(default_factory=list)


class ReportError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------- Hydra jobs
def short_name(key: str) -> str:
    """``estimator.prior.ngram_order`` -> ``ngram_order`` (the column title)."""
    return key.rsplit(".", 1)[-1]


def _value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def job_settings(job: Path) -> dict[str, Any]:
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    settings = {}
    for item in overrides:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if key in ("experiment", "sweep") or key.startswith("hydra"):
            continue
        settings[short_name(key)] = _value(value)
    return settings


def csv_curves(job: Path) -> dict[str, list[tuple[int, float]]]:
    """``train/loss`` per CSV-logged run under a job folder, keyed by the logger's run name."""
    curves = {}
    for path in job.glob("*/version_*/metrics.csv"):
        points = []
        with path.open() as handle:
            for row in csv.DictReader(handle):
                if row.get("train/loss") not in (None, ""):
                    points.append((int(float(row["step"])), float(row["train/loss"])))
        if points:
            curves[path.parent.parent.name] = points
    return curves


def runs_from_job(job: Path) -> list[Run]:
    settings = job_settings(job)
    curves = csv_curves(job)
    runs = []
    for result_file in sorted(job.glob("*_result.json")):
        stage = result_file.name.removesuffix("_result.json")
        result = json.loads(result_file.read_text())
        rows = result.get("rows") if isinstance(result, dict) and "rows" in result else [result]
        for row in rows:
            label = str(row.get("kind") or row.get("variant") or row.get("name") or stage)
            metrics = {k: float(row[k]) for k in METRICS if isinstance(row.get(k), (int, float))}
            if not metrics:
                continue
            extra = {
                k: row[k] for k in ("ngram_order", "gamma", "sampling_rounds", "label_smoothing") if k in row
            }
            curve = next((c for name, c in curves.items() if name.endswith(f"-{row.get('name')}")), [])
            # what was measured: a student folder, a model, or else the figures themselves (the proxy rows
            # every job of a sweep repeats from the cache)
            key = str(row.get("folder") or row.get("model") or json.dumps(metrics, sort_keys=True))
            runs.append(Run(label, {**settings, **extra}, metrics, str(job), key, curve))
    return runs


# ---------------------------------------------------------------------------------------------- wandb offline
def wandb_records(path: Path) -> Iterable[bytes]:
    """Raw records of a ``.wandb`` file: a LevelDB-style log (32 KiB blocks; 7-byte headers of crc32,
    length, type; types full / first / middle / last) after a 7-byte ``:W&B`` header."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ReportError(f"{path} is not a wandb run file")
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's last bytes are padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:
            continue


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def read_wandb_run(path: Path) -> dict[str, Any]:
    """Config (flattened), group, tags, name, last values and ``train/loss`` history of one offline run."""
    from wandb.proto import wandb_internal_pb2 as pb

    run: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "group": "", "tags": [], "name": ""}

    def key_of(item) -> str:
        return item.key or "/".join(item.nested_key)

    for raw in wandb_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["group"], run["tags"] = record.run.run_group, list(record.run.tags)
            run["name"] = record.run.display_name
            for item in record.run.config.update:  # wandb.init(config=...) lands here
                run["config"].update(_flatten(json.loads(item.value_json), key_of(item)))
        elif kind == "config":
            for item in record.config.update:
                run["config"].update(_flatten(json.loads(item.value_json), key_of(item)))
        elif kind == "history":
            values = {key_of(i): json.loads(i.value_json) for i in record.history.item}
            run["summary"].update({k: v for k, v in values.items() if not k.startswith("_")})
            if "train/loss" in values:
                run["history"].append(
                    (int(values.get("trainer/global_step", len(run["history"]))), values["train/loss"])
                )
        elif kind == "summary":
            for item in record.summary.update:
                if not key_of(item).startswith("_"):
                    run["summary"][key_of(item)] = json.loads(item.value_json)
    return run


NOISY = ("output_dir", "save_dir", "run_name", "artifacts_dir", "run_group", "run_tags")


def runs_from_wandb(files: Sequence[Path]) -> list[Run]:
    raw = [(path, read_wandb_run(path)) for path in files]
    configs = [{k: v for k, v in r["config"].items() if k.startswith("kdl.")} for _, r in raw]
    keys = sorted({k for c in configs for k in c})
    swept = [
        k
        for k in keys
        if not any(n in k for n in NOISY) and len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1
    ]
    swept = [k for k in swept if not isinstance(configs[0].get(k), (list, dict))]
    runs = []
    for (path, run), config in zip(raw, configs):
        summary = run["summary"]
        metrics = {}
        for name in METRICS:
            for key in (f"heldout/{name}", f"eval/{name}", f"fidelity/{name}", name):
                if isinstance(summary.get(key), (int, float)):
                    metrics[name] = float(summary[key])
                    break
        if not metrics:
            continue
        label = str(run["config"].get("run") or run["name"])
        settings = {short_name(k.removeprefix("kdl.")): config.get(k) for k in swept}
        runs.append(Run(label, settings, metrics, str(path), str(path), run["history"]))
    return runs


# ---------------------------------------------------------------------------------------------- collect
def collect_runs(folders: Sequence[str | Path]) -> list[Run]:
    """Every run under the folders: Hydra job folders first; wandb offline runs where there are none."""
    runs: list[Run] = []
    wandb_files: set[Path] = set()  # read together: swept settings are those that differ between runs
    for folder in map(Path, folders):
        if not folder.exists():
            raise ReportError(f"{folder} does not exist; pass a multirun folder (multirun/<stage>/<time>)")
        jobs = sorted({p.parent.parent for p in folder.rglob(".hydra/overrides.yaml")}, key=str)
        jobs = [j for j in jobs if any(j.glob("*_result.json"))]
        if jobs:
            for job in jobs:
                runs += runs_from_job(job)
        else:
            wandb_files |= {p.resolve() for p in folder.rglob("run-*.wandb") if "latest-run" not in p.parts}
    runs += runs_from_wandb(sorted(wandb_files))
    if not runs:
        raise ReportError(
            f"no runs found under {', '.join(map(str, folders))}: expected Hydra job folders with "
            "<stage>_result.json, or wandb offline runs (wandb/offline-run-*)"
        )
    return merge_runs(runs)


def merge_runs(runs: list[Run]) -> list[Run]:
    """One row per measured thing: settings that differ between its copies become ``*``."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.label, run.key)].append(run)
    merged = []
    for (label, key), copies in groups.items():
        names = list(dict.fromkeys(k for r in copies for k in r.settings))
        settings = {
            n: copies[0].settings.get(n) if len({json.dumps(r.settings.get(n)) for r in copies}) == 1 else ANY
            for n in names
        }
        curve = next((r.curve for r in copies if r.curve), [])
        merged.append(Run(label, settings, copies[0].metrics, copies[0].source, key, curve))
    return merged


def swept_settings(runs: Sequence[Run]) -> list[str]:
    names = list(dict.fromkeys(k for r in runs for k in r.settings))
    return [n for n in names if len({json.dumps(r.settings.get(n)) for r in runs}) > 1]


def _sort_key(value: Any) -> tuple:
    return (value == ANY, isinstance(value, str), value if not isinstance(value, str) else 0, str(value))


# ---------------------------------------------------------------------------------------------- outputs
def markdown_table(runs: Sequence[Run]) -> str:
    columns = swept_settings(runs)
    metrics = [m for m in METRICS if any(m in r.metrics for r in runs)]
    ordered = sorted(runs, key=lambda r: (r.label, *(_sort_key(r.settings.get(c)) for c in columns)))
    lines = [
        "| run | " + " | ".join(columns + metrics) + " |",
        "|---|" + "---:|" * len(columns + metrics),
    ]
    for run in ordered:
        cells = [str(run.settings.get(c, "")) for c in columns]
        cells += [f"{run.metrics[m]:.4f}" if m in run.metrics else "" for m in metrics]
        lines.append(f"| {run.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
