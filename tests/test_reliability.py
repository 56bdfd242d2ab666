"""Failure behaviour: kills at every write step, concurrent runs, corrupted stores, bad settings and inputs,
a loopback server that bad requests cannot break, and no credential in any file a run writes.

The fault-injection tests kill ``kdl`` (``os._exit``, as ``kill -9`` would) at the named points of
:func:`kd_lightning.artifacts.fault_point`, rerun the same command, and compare the artifact with the one a
clean run builds. Their counts are in the README's "Failure behaviour" section.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from kd_lightning.artifacts import build_events
from tests.helpers.cli import KDL, Completed, artifacts, kdl_process
from tests.helpers.cli import kdl as kdl_here


def kdl(cwd: Path, *args: str, env: dict | None = None) -> Completed | subprocess.CompletedProcess:
    """``kdl`` in this interpreter, or as a real process where a fault is injected (it ends the process)."""
    if env and "KDL_FAULT" in env:
        return kdl_process(*args, env_dir=cwd, env=env, check=False)
    return kdl_here(*args, env_dir=cwd, env=env, check=False)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{done.args}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def store_arrays(root: Path, kind: str) -> dict[str, dict[str, np.ndarray]]:
    """{key: {ids, probs, tail, offsets}} of every complete store of a kind."""
    return {
        folder.name: {n: np.load(folder / f"{n}.npy") for n in ("ids", "probs", "tail", "offsets")}
        for folder in sorted((root / kind).glob("*"))
        if (folder / "meta.json").is_file()
    }


def same_stores(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        for name in a[key]:
            np.testing.assert_array_equal(a[key][name], b[key][name], err_msg=f"{key}/{name}")


# --------------------------------------------------------------------------------------- kill points

STAGE_ARGS = {
    "prior": ["prior", "experiment=tiny"],
    "posterior": ["posterior", "experiment=tiny"],
    "distill": ["distill", "experiment=tiny", "loss=[hard_ce,prior_kl]"],
}
KILLS = [
    ("prior", "corpus:before-rename"),
    ("prior", "store:before-rename"),
    ("prior", "stage:before-result"),
    ("posterior", "align:before-rename"),
    ("posterior", "shard:written@2"),
    ("posterior", "store:before-rename@2"),  # the first store written is the prior
    ("distill", "distill:before-student-rename"),
    ("distill", "distill:student-saved"),
    ("distill", "stage:before-result"),
]


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory, tiny_dir) -> dict[str, Path]:
    """Each stage run once, uninterrupted, in its own artifacts folder: the reference artifacts."""
    roots = {}
    for stage, args in STAGE_ARGS.items():
        work = tmp_path_factory.mktemp(f"clean-{stage}")
        ok(kdl(work, *args, env={"KDL_TINY": str(tiny_dir), "KDL_ARTIFACTS": str(work / "artifacts")}))
        roots[stage] = work / "artifacts"
    return roots


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "point"), KILLS, ids=[f"{s}-{p}" for s, p in KILLS])
def test_a_kill_at_any_write_step_is_survived(stage, point, clean_runs, kdl_env):
    env = {"KDL_ARTIFACTS": str(kdl_env / "artifacts")}
    killed = kdl(kdl_env, *STAGE_ARGS[stage], env={**env, "KDL_FAULT": point})
    assert killed.returncode == 137, f"{point} was never reached:\n{killed.stderr[-2000:]}"
    ok(kdl(kdl_env, *STAGE_ARGS[stage], env=env))
    root, clean = kdl_env / "artifacts", clean_runs[stage]
    for kind in ("prior", "posterior"):
        if (clean / kind).is_dir():
            same_stores(store_arrays(clean, kind), store_arrays(root, kind))
    if stage == "distill":
        (mine,) = [json.loads(p.read_text()) for p in root.glob("distill/*/result.json")]
        (ref,) = [json.loads(p.read_text()) for p in clean.glob("distill/*/result.json")]
        assert mine["nll"] == ref["nll"] and mine["tokens"] == ref["tokens"]
        (student,) = [p for p in (root / "distill").iterdir() if p.is_dir()]
        trained = build_events(student, "train")
        if point in ("distill:student-saved", "stage:before-result"):  # saved: finished without retraining
            assert len(trained) == 1, trained
            assert len(build_events(student, "build")) == (2 if point == "distill:student-saved" else 1)
    assert not list(root.rglob(".*")), list(root.rglob(".*"))  # no temp folder or file left behind
    assert not list(root.rglob("*.partial"))


@pytest.mark.slow
def test_posterior_resumed_with_another_shard_size_then_the_first(kdl_env, clean_runs):
    """A killed posterior resumed with another shard size (a different store) and then the first size."""
    env = {"KDL_ARTIFACTS": str(kdl_env / "artifacts")}
    base = STAGE_ARGS["posterior"]
    assert kdl(kdl_env, *base, env={**env, "KDL_FAULT": "shard:written@3"}).returncode == 137
    ok(kdl(kdl_env, *base, "estimator.posterior.shard_size=5", env=env))
    ok(kdl(kdl_env, *base, env=env))  # resumes its own finished shards
    stores = store_arrays(kdl_env / "artifacts", "posterior")
    assert len(stores) == 2  # shard size is part of the store's identity: two stores, never mixed
    reference = store_arrays(clean_runs["posterior"], "posterior")
    (key,) = reference
    same_stores(reference, {key: stores[key]})


# ------------------------------------------------------------------------------------ concurrent runs


HOLD_AT = {
    "prior": "store:before-rename",
    "posterior": "align:before-rename",
    "distill": "distill:student-saved",
}
"""Where the first of two identical commands holds its artifact's lock while the second one arrives."""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["prior", "posterior", "distill"])
def test_identical_commands_started_together_build_once(stage, kdl_env):
    """The first process is held inside a build (KDL_HOLD) until the second has said it waits for it; then
    both finish. Every artifact records exactly one build, and the second read the first's result."""
    root, go = kdl_env / "artifacts", kdl_env / "go"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KDL_ARTIFACTS": str(root)}

    def start(extra: dict) -> tuple[subprocess.Popen, list[str]]:
        process = subprocess.Popen([*KDL, *STAGE_ARGS[stage]], cwd=kdl_env, env={**env, **extra},
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
        return process, lines

    first, first_out = start({"KDL_HOLD": f"{HOLD_AT[stage]}={go}"})
    wait_until(lambda: Path(f"{go}.held").exists() or first.poll() is not None)
    second, second_out = start({})
    wait_until(
        lambda: any("is being built by process" in line for line in second_out) or second.poll() is not None
    )
    go.touch()
    assert first.wait(timeout=600) == 0 and second.wait(timeout=600) == 0, "".join(first_out + second_out)[
        -4000:
    ]
    waited = [line for line in second_out if "is being built by process" in line]
    assert waited and f"process {first.pid} on" in waited[0], "".join(second_out)[-2000:]
    kinds = {
        "prior": ["corpus", "prior"],
        "posterior": ["prior", "posterior", "align"],
        "distill": ["prior", "distill"],
    }
    for kind in kinds[stage]:
        (folder,) = [p for p in (root / kind).iterdir() if p.is_dir() and not p.name.startswith(".")]
        assert len(build_events(folder, "build")) == 1, (kind, build_events(folder))
    assert not list(root.rglob("*.partial"))
    if stage == "distill":  # trained once: the second process waited and read the first one's result
        (student,) = [p for p in (root / "distill").iterdir() if p.is_dir()]
        assert len(build_events(student, "train")) == 1
        results = [json.loads(p.read_text()) for p in kdl_env.glob("outputs/distill/*/distill_result.json")]
        assert len(results) == 2 and results[0] == results[1]
    outputs = sorted(kdl_env.glob(f"outputs/{stage}/*"))
    assert len(outputs) == 2  # each run its own output folder, even when started in the same second


def wait_until(condition, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for a process"
        time.sleep(0.05)


def test_a_second_process_waits_for_the_lock_and_says_who_holds_it(tmp_path, caplog):
    """The holder keeps the lock until a file appears, so the wait is certain: this process says who holds
    it, and gets the lock only after the holder let go."""
    from kd_lightning.artifacts import artifact_lock

    target, release = tmp_path / "prior" / "abc", tmp_path / "release"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pathlib import Path; from kd_lightning.artifacts import artifact_lock\n"
            f"with artifact_lock(Path({str(target)!r})):\n"
            f"    print('held', flush=True)\n"
            f"    while not Path({str(release)!r}).exists(): time.sleep(0.02)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    acquired: dict[str, bool] = {}

    def take() -> None:
        with artifact_lock(target):
            acquired["after_release"] = release.exists()

    with caplog.at_level("WARNING"):
        waiter = threading.Thread(target=take)
        waiter.start()
        wait_until(lambda: "is being built by" in caplog.text)
        assert not acquired  # still waiting while the holder holds the lock
        release.touch()
        waiter.join(timeout=60)
    holder.wait(timeout=30)
    assert acquired == {"after_release": True}
    assert f"{target} is being built by process {holder.pid}" in caplog.text


@pytest.mark.slow
def test_a_parallel_multirun_shares_upstream_artifacts(kdl_env):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    env = {"KDL_ARTIFACTS": str(kdl_env / "artifacts")}
    ok(  # the launcher starts worker processes: a real process launches them
        kdl_process(
            "distill",
            "-m",
            "experiment=tiny",
            "loss=[hard_ce,prior_kl]",
            "prior_kl_weight=0.5,1.0",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            env_dir=kdl_env,
            env=env,
            check=False,
        )
    )
    root = kdl_env / "artifacts"
    assert len(list(root.glob("prior/*/meta.json"))) == 1  # built once, shared by both jobs
    assert len(list(root.glob("distill/*/result.json"))) == 2


# --------------------------------------------------------------------------------- corrupted stores


def corrupt(folder: Path, how: str) -> None:
    if how == "nan":
        probs = np.load(folder / "probs.npy")
        probs[3, 0] = np.nan
        np.save(folder / "probs.npy", probs)
    elif how == "negative":
        probs = np.load(folder / "probs.npy")
        probs[2, 1] = -0.25
        np.save(folder / "probs.npy", probs)
    elif how == "unnormalised":
        tail = np.load(folder / "tail.npy")
        tail[5] += 0.5
        np.save(folder / "tail.npy", tail)
    elif how == "out_of_vocabulary":
        ids = np.load(folder / "ids.npy").astype(np.int32)
        ids[1, 0] = 60000
        np.save(folder / "ids.npy", ids)
    elif how == "cut_meta":
        text = (folder / "meta.json").read_text()
        (folder / "meta.json").write_text(text[: len(text) // 2])
    elif how == "cut_npy":
        data = (folder / "probs.npy").read_bytes()
        (folder / "probs.npy").write_bytes(data[: len(data) // 2])
    elif how == "missing_npy":
        (folder / "tail.npy").unlink()
    else:
        raise ValueError(how)


CORRUPTIONS = ["nan", "negative", "unnormalised", "out_of_vocabulary", "cut_meta", "cut_npy", "missing_npy"]


@pytest.fixture(scope="module")
def built_prior(tmp_path_factory, tiny_dir) -> Path:
    """An artifacts folder holding the tiny corpus and prior (copied by each corruption test)."""
    work = tmp_path_factory.mktemp("prior")
    ok(
        kdl(
            work,
            "prior",
            "experiment=tiny",
            env={"KDL_TINY": str(tiny_dir), "KDL_ARTIFACTS": str(work / "a")},
        )
    )
    return work / "a"


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_corrupted_store_is_a_one_line_error_naming_it(how, kdl_env, built_prior):
    import shutil

    env = {"KDL_ARTIFACTS": str(kdl_env / "artifacts")}
    shutil.copytree(built_prior, kdl_env / "artifacts")
    (folder,) = [p for p in (kdl_env / "artifacts" / "prior").iterdir() if (p / "meta.json").is_file()]
    corrupt(folder, how)
    done = kdl(kdl_env, "distill", "experiment=tiny", "loss=[hard_ce,prior_kl]", env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("kdl distill: error:") and str(folder) in last, last
    assert "rebuild=[prior]" in last or "rerun" in last
    assert "Traceback" not in done.stderr
    assert not list((kdl_env / "artifacts").glob("distill/*/result.json"))


def test_an_estimator_that_writes_bad_rows_caches_nothing(tmp_path):
    from kd_lightning.data.soft_labels import SparseRows, StoreCorruptError, write_store

    rows = SparseRows(
        ids=np.array([[1, 2], [3, 4]], dtype=np.uint16),
        probs=np.array([[0.5, 0.3], [0.9, np.nan]], dtype=np.float16),
        tail=np.array([0.2, 0.1], dtype=np.float32),
    )
    with pytest.raises(StoreCorruptError, match="row 1 holds a non-finite probability"):
        write_store(tmp_path / "store", rows, np.array([0, 2]), {"x": 1})
    assert not (tmp_path / "store").exists()


def test_non_finite_nll_is_never_cached(kdl_env, tiny_dir):
    """A student whose training diverges, and a model whose weights are NaN: one line each, and neither
    a result.json nor an evaluation is cached (the next run would otherwise serve it)."""
    diverged = kdl(kdl_env, "distill", "experiment=tiny", "loss=[hard_ce]", "optimizer.lr=1e30")
    assert diverged.returncode == 1 and "Traceback" not in diverged.stderr
    last = diverged.stderr.strip().splitlines()[-1]
    assert "has a non-finite held-out NLL" in last and "training diverged, so nothing was cached" in last, (
        last
    )
    (student,) = artifacts(kdl_env, "distill")
    assert not (student / "result.json").exists()
    import shutil

    from safetensors.torch import load_file, save_file

    broken = kdl_env / "nan_model"
    shutil.copytree(tiny_dir, broken)
    (weights,) = broken.glob("*.safetensors")
    tensors = {name: t.fill_(float("nan")) for name, t in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    done = kdl(kdl_env, "evaluate", "experiment=tiny", f"models_to_evaluate=[{broken}]")
    assert done.returncode == 1 and "non-finite held-out NLL" in done.stderr.strip().splitlines()[-1]
    assert "not cached; check the model's weights" in done.stderr
    assert not [
        p for p in (kdl_env / "artifacts" / "eval").glob("*.json") if not p.name.endswith(".builds.jsonl")
    ]


def test_model_identity_covers_weight_contents(tiny_dir, tmp_path, monkeypatch):
    import shutil

    from safetensors.numpy import load_file, save_file

    from kd_lightning.artifacts import model_identity

    monkeypatch.setenv("KDL_ASSETS", str(tmp_path / "assets"))
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    before = model_identity(str(folder))
    assert model_identity(str(folder)) == before  # remembered, not re-hashed: same answer
    (weights,) = folder.glob("*.safetensors")
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] * 1.5  # same shapes, same file size, other weights
    size = weights.stat().st_size
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size
    assert model_identity(str(folder)) != before


# ------------------------------------------------------------------------------- bad settings, inputs

BAD_SETTINGS = [
    ("prior", "estimator.posterior.shard_size=0", "estimator.posterior.shard_size must be >= 1"),
    ("prior", "estimator.posterior.batch_size=0", "estimator.posterior.batch_size must be >= 1"),
    ("prior", "estimator.posterior.top_k=0", "estimator.posterior.top_k must be >= 1"),
    ("distill", "datamodule.batch_size=0", "datamodule.batch_size must be >= 1"),
    ("prior", "estimator.prior.top_k=0", "top_k must be >= 1"),
    ("prior", "estimator.prior.gamma=0.5", "gamma must be >= 1"),
    ("prior", "data.heldout_size=0", "data.heldout_size must be >= 1"),
    ("prior", "data.max_seq_len=1", "data.max_seq_len must be >= 2"),
    ("align", "alignment.learning_rate=-1", "alignment.learning_rate must be > 0"),
    ("prior", "estimator.teacher_targets.k=0", "estimator.teacher_targets.k must be >= 1"),
    ("prior", "data.path=/no/such/corpus.jsonl", "data.path=/no/such/corpus.jsonl does not exist"),
    ("distill", "optimizer.lr=-0.1", "optimizer settings: Invalid learning rate: -0.1"),
]


@pytest.mark.parametrize(("stage", "setting", "message"), BAD_SETTINGS, ids=[s for _, s, _ in BAD_SETTINGS])
def test_bad_settings_are_one_line_errors_at_start_up(stage, setting, message, kdl_env):
    done = kdl(kdl_env, stage, "experiment=tiny", setting)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kdl {stage}: error:") and message in last, last
    assert "Traceback" not in done.stderr


def test_an_unknown_loss_lists_the_valid_names(kdl_env):
    done = kdl(kdl_env, "distill", "experiment=tiny", "loss=[hard_ce,foo]")
    assert done.returncode == 2
    assert "loss=foo is not an option of the loss group; choose from: adaptive_kl" in done.stderr
    assert "prior_kl" in done.stderr and "Traceback" not in done.stderr


def test_corpus_encoding_errors_name_file_and_line(tmp_path):
    from kd_lightning.data.records import CorpusError, read_jsonl

    row = json.dumps({"instruction": "say hi.", "response": "hi."})
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (row + "\n").encode() * 2)
    assert len(read_jsonl(bom)) == 2  # a byte-order mark is accepted
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(
        (row + "\n").encode() + '{"instruction": "caf\xe9", "response": "x"}\n'.encode("latin-1")
    )
    with pytest.raises(CorpusError, match=r"latin1\.jsonl:2: not UTF-8 \(byte 0xe9 at column 21\)"):
        read_jsonl(latin)


def test_duplicate_prompts_across_the_split_leave_the_held_out_side(kdl_env, tiny_dir, caplog):
    from kd_lightning.cli.build import build_context
    from tests.helpers.configs import compose_cfg

    rows = [json.loads(line) for line in (tiny_dir / "corpus.jsonl").read_text().splitlines()]
    corpus = kdl_env / "dupes.jsonl"
    # every prompt twice, with different responses: the hash split puts both copies on one side unless
    # the cut falls between them; which prompts straddle is what the pipeline must catch
    doubled = rows + [{**r, "response": r["response"] + " again."} for r in rows]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in doubled))
    cfg = compose_cfg(["experiment=tiny", f"data.path={corpus}", "data.heldout_size=9"])
    heldout = build_context(cfg).corpus().heldout
    from kd_lightning.data.records import read_jsonl, split_records

    tr, held = split_records(read_jsonl(corpus), 9)
    straddle = {r.key for r in held} & {r.key for r in tr}
    assert straddle  # 9 is odd: one pair is cut in two
    assert len(heldout) == 9 - len([r for r in held if r.key in straddle])


# --------------------------------------------------------------------------- the loopback server


def post(url: str, body: bytes | dict, key: str | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/chat/completions", data=data, method="POST")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


MALFORMED = [
    {"model": "tiny", "messages": None},
    {"model": "tiny", "messages": []},
    {"model": "tiny", "messages": "hello"},
    {"model": "tiny", "messages": [{"role": "user"}]},
    {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "abc"},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 7},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 99},
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": "x"},
    {"messages": [{"role": "user", "content": "hi"}]},
    [1, 2, 3],
]


def test_the_server_answers_every_malformed_request_400_then_serves(tiny_dir):
    from kd_lightning.models.chat import ChatGenerator
    from kd_lightning.models.loading import load_causal_lm, load_tokenizer
    from kd_lightning.teachers.server import OpenAICompatibleServer

    generator = ChatGenerator(load_causal_lm(tiny_dir), load_tokenizer(tiny_dir))
    good = {"model": "tiny", "messages": [{"role": "user", "content": "count 2 from 1."}], "max_tokens": 4}
    with OpenAICompatibleServer(generator, "tiny") as server:
        answered = 0
        for body in [*MALFORMED, b"not json at all", b"\xff\xfe"]:
            status, reply = post(server.url, body)
            assert status == 400 and reply["error"]["message"], (body, reply)
            answered += 1
        assert answered == len(MALFORMED) + 2
        status, reply = post(server.url, good)
        assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant"


def test_a_failing_generation_is_a_500_and_the_batch_loop_survives(tiny_dir):
    from kd_lightning.models.chat import ChatGenerator
    from kd_lightning.models.loading import load_causal_lm, load_tokenizer
    from kd_lightning.teachers.server import OpenAICompatibleServer

    generator = ChatGenerator(load_causal_lm(tiny_dir), load_tokenizer(tiny_dir))
    real = generator.generate
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    generator.generate = flaky
    good = {"model": "tiny", "messages": [{"role": "user", "content": "count 2 from 1."}], "max_tokens": 4}
    with OpenAICompatibleServer(generator, "tiny") as server:
        status, reply = post(server.url, good)
        assert status == 500 and "generation failed" in reply["error"]["message"]
        results = []
        threads = [threading.Thread(target=lambda: results.append(post(server.url, good))) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert [status for status, _ in results] == [200, 200, 200]


def test_the_server_refuses_to_serve_without_its_key(monkeypatch, capsys):
    from kd_lightning.teachers.server import main

    monkeypatch.delenv("KDL_SERVER_TEST_KEY", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["--model", "smollm2", "--api-key-env", "KDL_SERVER_TEST_KEY"])
    assert stopped.value.code == 2
    assert "KDL_SERVER_TEST_KEY, which is unset or empty" in capsys.readouterr().err


# ------------------------------------------------------------------------------- secrets in files


def test_redaction_of_urls_tokens_and_secret_values(monkeypatch):
    from kd_lightning.environment import redact

    monkeypatch.setenv("MY_SERVICE_API_KEY", "sk-live-0123456789")
    text = (
        "POST http://user:hunter2pass@example.test/v1 Authorization: Bearer abc.def-123 "
        "https://x.test/a?api_key=zzz&b=1 key sk-live-0123456789"
    )
    clean = redact(text)
    for secret in ("hunter2pass", "abc.def-123", "zzz", "sk-live-0123456789"):
        assert secret not in clean
    assert "http://***@example.test/v1" in clean and "&b=1" in clean


@pytest.mark.slow
def test_no_secret_in_any_file_a_generate_run_writes(tiny_dir, tmp_path, monkeypatch):
    from kd_lightning.models.chat import ChatGenerator
    from kd_lightning.models.loading import load_causal_lm, load_tokenizer
    from kd_lightning.teachers.server import OpenAICompatibleServer

    env_key, url_key = "sk-envkey-5f3a9c1e77", "urlpass-8d2b6e4410"
    (tmp_path / "instructions.txt").write_text("say something about the cat.\ncount 3 from 2.\n")
    generator = ChatGenerator(load_causal_lm(tiny_dir), load_tokenizer(tiny_dir))
    with OpenAICompatibleServer(generator, "tiny") as server:  # no auth: the client's key is just sent
        base = server.url.replace("http://", f"http://user:{url_key}@")
        done = kdl(
            tmp_path,
            "generate",
            "teacher_backend=openai",
            "teacher_backend.model=tiny",
            f"teacher_backend.base_url={base}",
            "teacher_backend.api_key_env=KDL_LEAK_TEST_API_KEY",
            "teacher_backend.backoff_s=0.01",
            "generation_task=instructions_file",
            "generation_task.path=instructions.txt",
            "sampling.max_new_tokens=4",
            "progress=false",
            "corpus_dir=corpus",
            "cache_dir=cache",
            env={"KDL_LEAK_TEST_API_KEY": env_key, "KDL_ARTIFACTS": str(tmp_path / "artifacts")},
        )
        ok(done)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "main.log" for p in written) and any(p.name == "corpus.jsonl" for p in written)
    assert "HTTP Request" in next(p for p in written if p.name == "main.log").read_text()
    for path in written:
        data = path.read_bytes()
        assert env_key.encode() not in data and url_key.encode() not in data, path
    for stream in (done.stdout, done.stderr):
        assert env_key not in stream and url_key not in stream


def test_the_readme_quickstart_commands_compose(kdl_env):
    """Every `kdl` command of the README's Quickstart composes (overrides, groups, keys) as written.

    Composing is where the README's old MiniLLM command failed ("Key 'max_steps' is not in struct"); the
    commands themselves train on the real model for minutes each, which the demo and the integration
    tests cover.
    """
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith("kdl ") and not line.startswith("kdl report"):
                commands.append(shlex.split(line.replace("<SFT student>", str(kdl_env))))
    assert len(commands) >= 15

    def first_of_sweep(arg: str) -> str:  # `-m key=a,b,c` composes as its first job, key=a
        key, _, value = arg.partition("=")
        return f"{key}={value.split(',')[0]}" if "," in value and "[" not in value else arg

    from kd_lightning.cli.overrides import check_group_choices
    from tests.helpers.configs import compose_cfg

    for argv in commands:
        stage, rest = argv[1], argv[2:]
        if "-m" in rest:
            rest = [first_of_sweep(a) for a in rest if a != "-m"]
        check_group_choices(stage, rest)  # what `kdl` checks before Hydra composes
        cfg = compose_cfg(rest, stage)  # what Hydra composes: groups, keys, struct (trainer.max_steps)
        assert cfg.stage == stage, argv


def test_the_server_command_serves_and_scores_within_its_log_prob_cap(tiny_dir):
    """`python -m kd_lightning.teachers.server` as users start it (it once crashed at start-up on a
    missing --max-logprobs option, and no test ran the command)."""
    import json
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    command = [sys.executable, "-m", "kd_lightning.teachers.server", "--model", str(tiny_dir),
               "--name", "tiny", "--port", "0", "--no-auth", "--max-logprobs", "5"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("serving "), line
        url = line.split(" at ")[1].strip()
        models = json.loads(urllib.request.urlopen(f"{url}/models", timeout=30).read())
        assert models["data"][0]["id"] == "tiny"

        def score(k: int) -> int:
            body = {"model": "tiny", "prompt": [3, 4, 5, 6], "max_tokens": 1, "prompt_logprobs": k}
            request = urllib.request.Request(
                f"{url}/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            try:
                return urllib.request.urlopen(request, timeout=60).status
            except urllib.error.HTTPError as err:
                return err.code

        assert score(5) == 200 and score(6) == 400
    finally:
        process.terminate()
        process.wait(timeout=30)
