"""teacher=served: a teacher behind an OpenAI-compatible server (vLLM's prompt_logprobs, or the OpenAI
completions API's echo), driven over real HTTP against the loopback server serving the tiny model."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest

from kd_lightning.generation.chat import ChatGenerator
from kd_lightning.generation.server import OpenAICompatibleServer
from kd_lightning.models.loading import load_causal_lm, load_tokenizer
from tests.helpers.cli import artifacts, kdl, kdl_process

KEY_ENV = "KDL_TEACHER_API_KEY"


@pytest.fixture(scope="module")
def generator(tiny_dir) -> ChatGenerator:
    return ChatGenerator(load_causal_lm(tiny_dir), load_tokenizer(tiny_dir))


@pytest.fixture()
def env(kdl_env, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "test-key")
    return kdl_env


def served(server: OpenAICompatibleServer, api: str, k: int, *extra: str, retries: int = 2) -> list[str]:
    return [
        "teacher-logits", "experiment=tiny", "teacher=served", f"teacher.base_url={server.url}",
        "teacher.model=tiny", f"teacher.api={api}", f"estimator.teacher_targets.k={k}",
        "teacher.backoff_s=0.01", f"teacher.max_retries={retries}", *extra,
    ]  # fmt: skip


def stores(env) -> dict[str, dict[str, np.ndarray]]:
    found = {}
    for folder in artifacts(env, "teacher_logits"):
        if (folder / "meta.json").is_file():
            teacher = json.loads((folder / "meta.json").read_text())["provenance"]["teacher"]
            found[teacher.get("api", "in-process")] = {
                n: np.load(folder / f"{n}.npy") for n in ("ids", "probs", "tail")
            }
    return found


@pytest.mark.parametrize("k", [8, 20])
def test_the_served_store_equals_the_in_process_store_in_both_wire_forms(k, env, tiny_dir, generator):
    kdl("teacher-logits", "experiment=tiny", "teacher=local", f"teacher.path={tiny_dir}",
        f"estimator.teacher_targets.k={k}", env_dir=env)  # fmt: skip
    with OpenAICompatibleServer(generator, "tiny") as server:
        for api in ("vllm", "openai_completions"):
            kdl(*served(server, api, k), env_dir=env)
        asked = len(server.completion_requests)
    found = stores(env)
    reference = found.pop("in-process")
    assert set(found) == {"vllm", "openai_completions"}
    for api, store in found.items():
        np.testing.assert_array_equal(store["ids"], reference["ids"], err_msg=api)  # same ids
        np.testing.assert_allclose(
            store["probs"].astype(np.float32), reference["probs"].astype(np.float32), atol=1e-3, err_msg=api
        )  # within fp16
        np.testing.assert_allclose(store["tail"], reference["tail"], atol=1e-3, err_msg=api)
    served_stats = [
        json.loads(p.read_text()) for p in (env / "artifacts" / "teacher_logits").glob("*.stats.json")
    ]
    served_stats = [s for s in served_stats if "requests" in s]
    assert (
        len(served_stats) == 2 and sum(s["requests"] for s in served_stats) + 2 == asked
    )  # + the two probes
    assert all(s["prompt_tokens"] > 0 and s["retries"] == {} for s in served_stats)


def test_retries_on_429_and_5xx_are_counted_and_the_store_is_complete(env, generator):
    with OpenAICompatibleServer(generator, "tiny", faults=["429", "500", "429"]) as server:
        kdl(*served(server, "vllm", 8, retries=4), env_dir=env)  # the faults land on the probe
    (stats,) = [
        json.loads(p.read_text()) for p in (env / "artifacts" / "teacher_logits").glob("*.stats.json")
    ]
    assert stats["retries"] == {"rate_limited": 2, "server_error": 1}
    assert len(stores(env)) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD = {
    "server down": ([], {}, [], "cannot be reached"),
    "wrong model": (["teacher.model=other"], {}, [], "answered 404 for model 'other'"),
    "refused key": ([], {"api_key": "another-key"}, [], "refused the key (401)"),
    "malformed JSON": ([], {}, ["malformed"] * 10, "answered with something that is not a scoring reply"),
    "positions": ([], {}, [None, "short"], "scored 26 positions of a prompt of 27 tokens"),
    "k above the cap": (["estimator.teacher_targets.k=25"], {}, [], "is above teacher.max_logprobs=20"),
    "k above the server's cap": ([], {"max_logprobs": 4}, [], "refused the request"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_answer_is_one_line_and_nothing_is_cached(case, env, generator):
    extra, server_settings, faults, message = BAD[case]
    with OpenAICompatibleServer(generator, "tiny", faults=faults, **server_settings) as server:
        args = served(server, "vllm", 8, *extra)
        if case == "server down":
            args = [a.replace(server.url, f"http://127.0.0.1:{free_port()}/v1") for a in args]
        done = kdl(*args, env_dir=env, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("kdl teacher-logits: error:") and message in line, line
    assert not list((env / "artifacts").glob("teacher_logits/*/meta.json"))
    assert "test-key" not in done.stdout + done.stderr


def test_a_killed_run_resumes_from_its_shards_to_the_same_store(env, generator):
    with OpenAICompatibleServer(generator, "tiny") as server:
        args = served(server, "vllm", 8, "estimator.teacher_targets.shard_size=4")
        killed = kdl_process(
            *args, env_dir=env, env={"KDL_FAULT": "shard:written@1", KEY_ENV: "test-key"}, check=False
        )
        assert killed.returncode == 137
        (partial,) = (env / "artifacts" / "teacher_logits").glob("*.partial")
        assert len(list(partial.glob("shard-*"))) == 1
        asked = len(server.completion_requests)
        kdl(*args, env_dir=env)
        resumed = stores(env)["vllm"]
        scored_again = len(server.completion_requests) - asked
    clean = env / "clean"
    clean.mkdir()
    with OpenAICompatibleServer(generator, "tiny") as server:
        kdl(*served(server, "vllm", 8, "estimator.teacher_targets.shard_size=4"), env_dir=clean,
            env={"KDL_ARTIFACTS": str(clean / "artifacts")})  # fmt: skip
        total = len(server.completion_requests)
    assert scored_again < total  # the finished shard was not asked again
    reference = stores(clean)["vllm"]
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name])


def test_a_student_trains_from_the_served_store_and_an_online_use_is_refused(env, generator):
    with OpenAICompatibleServer(generator, "tiny") as server:
        common = ["experiment=tiny", "teacher=served", f"teacher.base_url={server.url}", "teacher.model=tiny"]
        kdl(*served(server, "vllm", 8), env_dir=env)
        kdl("distill", *common, "estimator.teacher_targets.k=8", "kd_target=offline_teacher",
            "loss=[hard_ce,forward_kl]", env_dir=env)  # fmt: skip
        refused = kdl(
            "distill", *common, "kd_target=teacher", "loss=[hard_ce,forward_kl]", env_dir=env, check=False
        )
    (student,) = artifacts(env, "distill")
    assert json.loads((student / "result.json").read_text())["nll"] > 0
    assert refused.returncode == 1 and "kd_target=offline_teacher" in refused.stderr.strip().splitlines()[-1]
    assert os.environ[KEY_ENV] == "test-key"
