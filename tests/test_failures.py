"""Failures that must come out as one line naming what happened, where, and the fix; nothing half-written
is left looking complete, and a rerun after the fix gives what a clean run gives.

Each test reproduces the fault (a full disk while a store is written, a cut weights file, a burst of
clients on the loopback server, a SIGTERM, a hint typed as printed, ...) and checks the line.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from kd_lightning.artifacts import build_events
from tests.helpers.cli import KDL, artifacts, kdl

TINY = ["experiment=tiny"]


def last_line(done) -> str:
    return done.stderr.strip().splitlines()[-1]


def store_files(root: Path, kind: str) -> dict[str, bytes]:
    (folder,) = [p for p in (root / kind).iterdir() if (p / "meta.json").is_file()]
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------ a full disk


@pytest.mark.parametrize(
    "fault",
    [OSError(errno.ENOSPC, "No space left on device"), OSError("373144 requested and 153536 written")],
    ids=["ENOSPC", "numpy-short-write"],
)
def test_a_full_disk_while_a_store_is_written_is_one_line_and_the_rerun_is_bit_identical(
    fault, kdl_env, tmp_path_factory, monkeypatch
):
    clean = tmp_path_factory.mktemp("clean")
    kdl("prior", *TINY, env_dir=clean, env={"KDL_ARTIFACTS": str(clean / "artifacts")})
    save = np.save
    calls = {"n": 0}

    def full_disk(file, array, *args, **kwargs):
        if Path(str(file)).name == "probs.npy" and calls["n"] == 0:  # the store's biggest array
            calls["n"] += 1
            Path(str(file)).write_bytes(b"\x93NUMPY" + b"\0" * 100)  # a short write, then the error
            raise fault
        return save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", full_disk)
    done = kdl("prior", *TINY, env_dir=kdl_env, check=False)
    monkeypatch.setattr(np, "save", save)
    root = kdl_env / "artifacts"
    assert done.returncode == 1 and "Traceback" not in done.stderr
    line = last_line(done)
    assert line.startswith("kdl prior: error: the disk holding the artifacts folder") and str(root) in line
    assert re.search(r"needs about \d+(\.\d)? (KiB|MiB|B)\b", line), line
    assert "free space there or point KDL_ARTIFACTS at a folder on a disk with room" in line
    assert not list(root.glob("prior/*/meta.json")) and not list(root.rglob(".*tmp-*"))
    kdl("prior", *TINY, env_dir=kdl_env)  # space freed: the same command completes
    assert store_files(root, "prior") == store_files(clean / "artifacts", "prior")


# --------------------------------------------------------------------------- a cut weights file


def cut_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    (weights,) = target.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    return weights


@pytest.mark.parametrize(
    "slot",
    [
        ["align", "proxy.path={cut}"],
        ["distill", "loss=[hard_ce]", "student=local", "student.path={cut}"],
        ["distill", "loss=[hard_ce,forward_kl]", "kd_target=teacher", "teacher=local", "teacher.path={cut}"],
    ],
    ids=["proxy", "student", "teacher"],
)
def test_a_cut_weights_file_is_one_line_naming_it_in_every_model_slot(slot, kdl_env, tiny_dir):
    weights = cut_copy(tiny_dir, kdl_env / "cut")
    stage, *settings = slot
    done = kdl(stage, *TINY, *(s.format(cut=kdl_env / "cut") for s in settings), env_dir=kdl_env, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    line = last_line(done)
    assert f"{weights} cannot be read" in line and "cut short or corrupt" in line, line
    assert "rebuild=[align]" in line and "python -m kd_lightning.assets" in line
    assert not list((kdl_env / "artifacts").glob("distill/*/result.json"))


def test_a_cut_shipped_or_artifact_model_names_its_file(tiny_dir, tmp_path):
    from kd_lightning.models.loading import ModelFilesError, load_causal_lm, unreadable_weights

    weights = cut_copy(tiny_dir, tmp_path / "m")
    assert unreadable_weights(tmp_path / "m")[0] == weights
    with pytest.raises(ModelFilesError, match=re.escape(str(weights))):
        load_causal_lm(tmp_path / "m")
    assert unreadable_weights(tiny_dir) is None  # a whole file passes


# ------------------------------------------------------------------------- the server under load


def post_chat(url: str, timeout: float = 120) -> tuple[int, str | None]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "say hi"}], "max_tokens": 2}
    request = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            reply.read()
            return reply.status, None
    except urllib.error.HTTPError as err:
        err.read()
        return err.code, err.headers.get("Retry-After")


def burst(url: str, clients: int) -> list[tuple[int, str | None]]:
    """``clients`` requests started at once (one connection each); every outcome, or the exception."""
    results: list = [None] * clients
    start = threading.Barrier(clients)

    def one(i: int) -> None:
        start.wait()
        try:
            results[i] = post_chat(url)
        except Exception as err:  # a reset or refused connection: what must not happen
            results[i] = (type(err).__name__, str(err))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return results


def test_128_clients_at_once_are_each_answered_or_refused_with_retry_after(tiny_dir):
    from kd_lightning.models.chat import ChatGenerator
    from kd_lightning.models.loading import load_causal_lm, load_tokenizer
    from kd_lightning.teachers.server import OpenAICompatibleServer

    generator = ChatGenerator(load_causal_lm(tiny_dir), load_tokenizer(tiny_dir))
    with OpenAICompatibleServer(generator, "tiny", max_batch_size=16) as server:  # default bound: 256
        answered = burst(server.url, 128)
    assert answered == [(200, None)] * 128, [r for r in answered if r != (200, None)][:5]
    with OpenAICompatibleServer(generator, "tiny", max_batch_size=16, max_pending=16) as server:
        bounded = burst(server.url, 128)
        refused = server.refused_busy
    codes = {code for code, _ in bounded}
    assert codes <= {200, 503}, [r for r in bounded if r[0] not in (200, 503)][:5]  # no reset, no loss
    assert refused == sum(code == 503 for code, _ in bounded) > 0
    assert all(after == "1" for code, after in bounded if code == 503)


# ------------------------------------------------------------------------- hints as typed


def test_held_out_records_that_all_repeat_a_training_prompt_say_so_and_how_to_fix_it(kdl_env):
    # ten prompts, ten answers each: the 8 held out are answers to the first prompt in hash order, and
    # that prompt's other answers train, so every held-out record repeats a training prompt
    rows = [
        {"instruction": f"prompt {p}.", "response": f"answer {i} to {p}."}
        for p in range(10)
        for i in range(10)
    ]
    corpus = kdl_env / "same.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["prior", *TINY, f"data.path={corpus}", "data.heldout_size=8"]
    done = kdl(*args, env_dir=kdl_env, check=False)
    line = last_line(done)
    assert done.returncode == 1 and "data.heldout_size=8 held out 8 record(s)" in line, line
    assert "every one repeats a training prompt" in line
    assert "data.keep_duplicate_heldout=true" in line and "a larger data.heldout_size" in line
    kdl(*args, "data.keep_duplicate_heldout=true", env_dir=kdl_env)  # the first fix, as printed
    kdl(*args[:-1], "data.heldout_size=60", env_dir=kdl_env)  # the second


def test_switching_a_model_slot_keeps_no_stale_keys_or_names_them(kdl_env, tiny_dir):
    kdl("distill", *TINY, "loss=[hard_ce]", "student=local", f"student.path={tiny_dir}", env_dir=kdl_env)
    extra = ["+student.hidden_size=4", "+student.num_layers=1"]
    done = kdl(
        "distill", *TINY, "loss=[hard_ce]", "student=local", f"student.path={tiny_dir}", *extra,
        env_dir=kdl_env, check=False,
    )  # fmt: skip
    line = last_line(done)
    assert done.returncode == 1 and "student=local does not set hidden_size, num_layers" in line, line
    drops = re.search(r"drop them with (.*?)  \(set KDL_TRACEBACK", line).group(1).split()
    assert drops == ["~student.hidden_size", "~student.num_layers"]
    kdl("distill", *TINY, "loss=[hard_ce]", "student=local", f"student.path={tiny_dir}", *extra, *drops,
        env_dir=kdl_env)  # fmt: skip


HINT = re.compile(r"\b((?:data|estimator|alignment|datamodule|trainer|evaluation|loss|proxy|teacher|student|"
                  r"module|optimizer|scheduler)(?:\.[a-z_0-9]+)+)=(true|false|null|[0-9.e-]+)\b")  # fmt: skip


def printed_hints() -> list[str]:
    """Every ``group.key=value`` override with a literal value that the package's messages suggest."""
    root = Path(__file__).resolve().parents[1] / "kd_lightning"
    found = set()
    for source in root.rglob("*.py"):
        for literal in re.findall(r'f?"(?:[^"\\]|\\.)*"', source.read_text()):
            found.update(f"{key}={value}" for key, value in HINT.findall(literal))
    return sorted(found)


def test_an_unknown_rebuild_kind_names_the_registered_kinds(kdl_env):
    done = kdl("prior", *TINY, "rebuild=[priors]", env_dir=kdl_env, check=False)
    line = last_line(done)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "unknown artifact kind 'priors'; choose from ['corpus', 'prior', 'align'," in line, line
    assert not artifacts(kdl_env, "prior")  # refused before anything is built


def test_every_override_a_message_suggests_composes_as_printed(kdl_env):
    from tests.helpers.configs import compose_cfg

    hints = printed_hints()
    assert "data.keep_duplicate_heldout=true" in hints and len(hints) >= 8, hints
    for hint in hints:
        compose_cfg([*TINY, hint], "distill")  # Hydra refuses a key the configs do not have


def test_a_missing_hydra_plugin_names_the_extra_to_install(kdl_env, monkeypatch):
    import importlib.util

    find = importlib.util.find_spec

    def without_joblib(name, *args):
        return None if name.startswith("hydra_plugins.hydra_joblib") else find(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_joblib)
    done = kdl("distill", "-m", *TINY, "hydra/launcher=joblib", env_dir=kdl_env, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert last_line(done) == (
        "kdl distill: hydra/launcher=joblib needs a Hydra plugin that is not installed; "
        'run `pip install "kd_lightning[parallel]"`'
    )


def test_a_loss_yaml_of_the_previous_release_runs_with_one_deprecation_line(kdl_env):
    conf = kdl_env / "my_conf" / "loss"
    conf.mkdir(parents=True)
    (conf / "old_kl.yaml").write_text(
        "old_kl:\n  _target_: kd_lightning.losses.ForwardKL\n  target: prior\n  weight: 0.5\n"
    )
    done = kdl(
        "distill", *TINY, "loss=[hard_ce,old_kl]", f"hydra.searchpath=[file://{kdl_env / 'my_conf'}]",
        env_dir=kdl_env,
    )  # fmt: skip
    assert (
        "loss.old_kl.target is now kd_target (target: prior → kd_target: prior)" in done.stdout + done.stderr
    )
    (student,) = artifacts(kdl_env, "distill")
    assert json.loads((student / "result.json").read_text())["terms"] == {"hard_ce": 1.0, "old_kl": 0.5}
    assert artifacts(kdl_env, "prior")  # the term read the prior, as kd_target: prior does


# ---------------------------------------------------------------------------------- SIGTERM


@pytest.mark.slow
def test_sigterm_leaves_one_line_and_the_rerun_resumes_to_the_clean_result(kdl_env, tmp_path_factory):
    args = ["distill", *TINY, "loss=[hard_ce]", "trainer.max_epochs=6"]
    clean = tmp_path_factory.mktemp("clean")
    kdl(*args, env_dir=clean, env={"KDL_ARTIFACTS": str(clean / "artifacts")})
    process = subprocess.Popen(
        [*KDL, *args], cwd=kdl_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )  # the signal is the subject: a real process
    deadline = time.monotonic() + 300
    while not list(kdl_env.glob("artifacts/distill/*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("kdl distill: stopped by SIGTERM; finished artifacts under ")
    assert "rerun the same command to resume" in line and "Traceback" not in stderr
    (folder,) = artifacts(kdl_env, "distill")
    assert not (folder / "result.json").exists()
    kdl(*args, env_dir=kdl_env)
    (train,) = build_events(folder, "train")
    assert train["start_step"] > 0  # resumed from the checkpoint, not from step 0
    mine = json.loads((folder / "result.json").read_text())
    ref = json.loads(next((clean / "artifacts").glob("distill/*/result.json")).read_text())
    assert mine["nll"] == pytest.approx(ref["nll"], abs=1e-6) and mine["tokens"] == ref["tokens"]
