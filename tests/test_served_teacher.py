"""teacher=served: a teacher behind an OpenAI-compatible server (vLLM's prompt_logprobs, or the OpenAI
completions API's echo), driven over real HTTP against the loopback server serving the tiny model."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest

from kd_lightning.models.chat import ChatGenerator
from kd_lightning.models.loading import load_causal_lm, load_tokenizer
from kd_lightning.teachers.server import OpenAICompatibleServer
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
    "refused key": (
        [],
        {"api_key": "another-key"},
        [],
        "refused the request (401): check the key in $KDL_TEACHER_API_KEY",
    ),
    "bad request": ([], {}, ["bad_request"], "(not retried: the server's answer does not change on a retry)"),
    "malformed JSON": ([], {}, ["malformed"] * 10, "answered with something that is not a scoring reply"),
    "positions": ([], {}, [None, "short"], "positions of a prompt of"),
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


def test_a_student_trains_from_the_served_store_and_a_feature_term_is_refused(env, generator):
    with OpenAICompatibleServer(generator, "tiny") as server:
        common = ["experiment=tiny", "teacher=served", f"teacher.base_url={server.url}", "teacher.model=tiny"]
        kdl(*served(server, "vllm", 8), env_dir=env)
        kdl("distill", *common, "estimator.teacher_targets.k=8", "kd_target=offline_teacher",
            "loss=[hard_ce,forward_kl]", env_dir=env)  # fmt: skip
        refused = kdl(
            "distill", *common, "module=online_teacher", "loss=[hard_ce,hidden_mse]", env_dir=env, check=False
        )
    (student,) = artifacts(env, "distill")
    assert json.loads((student / "result.json").read_text())["nll"] > 0
    assert refused.returncode == 1 and "hidden states" in refused.stderr.strip().splitlines()[-1]
    assert os.environ[KEY_ENV] == "test-key"


def test_concurrent_scoring_requests_share_one_forward_and_score_as_if_alone(generator):
    """The loopback server batches concurrent prompt scoring (right-padded, as vLLM batches), so a served
    teacher's max_concurrency means something; each prompt's log-probs equal those it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    prompts = [[1 + (i * 7 + j) % 20 for j in range(5 + 3 * i)] for i in range(6)]
    with OpenAICompatibleServer(generator, "tiny", batch_wait_s=0.5) as server:
        alone = [server.score(ids) for ids in prompts]
        assert server.scorer.batches == [1] * len(prompts)
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(server.score, prompts))
        assert max(server.scorer.batches[len(prompts) :]) > 1  # shared forwards
    for ids, a, b in zip(prompts, alone, together):
        assert a.shape == b.shape == (len(ids) - 1, len(generator.tokenizer))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def served_rows(server: OpenAICompatibleServer, tokenizer, api: str = "vllm", k: int = 20):
    from kd_lightning.teachers.rows import ServedTeacherRows
    from kd_lightning.teachers.served import ServedTeacher

    teacher = ServedTeacher(server.url, "tiny", api=api, max_logprobs=k, backoff_s=0.01)
    return ServedTeacherRows(teacher, tokenizer)


@pytest.mark.parametrize("api", ["vllm", "openai_completions"])
def test_a_gkd_step_with_a_served_teacher_equals_the_in_process_teacher_cut_to_its_top_k(
    api, env, generator, tiny_dir
):
    """GKD's JSD(0.5) on left-padded rows (as rollouts are) with the teacher behind the loopback server equals
    the same step with the in-process teacher's top-20 + tail: the loss within 1e-5, the gradient within 1e-5."""
    import torch

    from kd_lightning.data.batch import PositionBatch, SoftLabels, TextBatch
    from kd_lightning.losses.functional import IGNORE_INDEX
    from kd_lightning.losses.sparsify import topk_rows
    from kd_lightning.losses.terms import GeneralizedJSD
    from kd_lightning.models.builders import tiny_llama
    from kd_lightning.models.forward import target_position_logits
    from kd_lightning.modules.distill import DistillModule

    tokenizer = load_tokenizer(tiny_dir)
    vocab = len(tokenizer)
    lengths, width = (7, 11, 4), 11
    input_ids = torch.full((3, width), tokenizer.pad_token_id)
    attention = torch.zeros_like(input_ids)
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    for row, n in enumerate(lengths):  # left padding; the last n - 2 positions are targets
        ids = torch.tensor([3 + (row * 5 + j * 3) % (vocab - 3) for j in range(n)])
        input_ids[row, width - n :], attention[row, width - n :] = ids, 1
        targets[row, width - n + 1 : width - 1] = ids[2:]
    batch = TextBatch(input_ids=input_ids, attention_mask=attention, target_ids=targets)
    mask = batch.target_mask
    jsd = GeneralizedJSD("teacher", beta=0.5)

    def step(packed: PositionBatch, student) -> tuple[torch.Tensor, torch.Tensor]:
        logits = target_position_logits(student, input_ids, attention, mask)[None]
        logits.retain_grad()
        loss = jsd(logits, packed)
        loss.backward()
        return loss.detach(), logits.grad

    student = tiny_llama(vocab, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=1)
    with OpenAICompatibleServer(generator, "tiny") as server:
        module = DistillModule(
            student, {"jsd": jsd}, optimizer=torch.optim.SGD, teacher=served_rows(server, tokenizer, api)
        )
        served_loss, served_grad = step(module.pack_positions(batch, mask), student)
    with torch.no_grad():
        teacher_logits = target_position_logits(generator.model, input_ids, attention, mask)
    reference = PositionBatch(batch.target_ids[mask][None])
    reference.soft_labels["teacher"] = SoftLabels(*(t[None] for t in topk_rows(teacher_logits, 20)))
    student.zero_grad()
    local_loss, local_grad = step(reference, student)
    assert int(mask.sum()) == sum(n - 2 for n in lengths)
    torch.testing.assert_close(served_loss, local_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(served_grad, local_grad, atol=1e-5, rtol=0)


def test_a_packed_row_is_scored_record_by_record(env, generator, tiny_dir):
    """In a packed row each record is scored alone (position_ids restart at 0): the second record's rows
    equal its rows when it has a row of its own."""
    import torch

    tokenizer = load_tokenizer(tiny_dir)
    first, second = [5, 9, 4, 7, 8], [6, 3, 11, 10]
    packed_ids = torch.tensor([first + second])
    positions = torch.tensor([list(range(5)) + list(range(4))])
    packed_mask = torch.zeros_like(packed_ids, dtype=torch.bool)
    packed_mask[0, 1:4] = packed_mask[0, 5:8] = True
    alone_mask = torch.zeros((1, 4), dtype=torch.bool)
    alone_mask[0, 0:3] = True
    with OpenAICompatibleServer(generator, "tiny") as server:
        rows = served_rows(server, tokenizer)
        packed = rows.rows(packed_ids, torch.ones_like(packed_ids), packed_mask, positions)
        alone = rows.rows(torch.tensor([second]), torch.ones((1, 4), dtype=torch.long), alone_mask)
    assert packed.ids.shape == (1, 6, 20)
    torch.testing.assert_close(packed.ids[:, 3:], alone.ids)
    torch.testing.assert_close(packed.probs[:, 3:], alone.probs)
    torch.testing.assert_close(packed.tail[:, 3:], alone.tail)


def test_kdl_trains_gkd_and_an_online_teacher_through_a_served_teacher(env, generator):
    with OpenAICompatibleServer(generator, "tiny") as server:
        common = ["experiment=tiny", "teacher=served", f"teacher.base_url={server.url}", "teacher.model=tiny"]
        kdl("distill", *common, "recipe=gkd", "teacher=served", "run_name=gkd", env_dir=env)
        scored_by_gkd = len(server.completion_requests)
        kdl("distill", *common, "module=online_teacher", "kd_target=teacher", "loss=[hard_ce,forward_kl]",
            "run_name=online", env_dir=env)  # fmt: skip
        refused = kdl("distill", *common, "recipe=minillm", "teacher=served", env_dir=env, check=False)
    results = [json.loads((s / "result.json").read_text()) for s in artifacts(env, "distill")]
    assert sorted(r["module"] for r in results) == ["OnPolicyDistillModule", "OnlineTeacherDistillModule"]
    assert all(np.isfinite(r["nll"]) for r in results)
    assert scored_by_gkd > 1 and len(server.completion_requests) > scored_by_gkd  # the probe, then steps
    assert refused.returncode == 1 and "teacher=served gives top-k" in refused.stderr.strip().splitlines()[-1]


def test_without_a_key_no_authorization_is_sent_and_a_server_that_wants_one_says_which_variable(
    kdl_env, generator, monkeypatch
):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with OpenAICompatibleServer(generator, "tiny") as server:  # a local server started without a key
        kdl(*served(server, "vllm", 8), env_dir=kdl_env)
        assert server.authorizations and set(server.authorizations) == {None}
    with OpenAICompatibleServer(generator, "tiny", api_key="secret-key") as server:
        done = kdl(*served(server, "vllm", 8, "rebuild=[teacher_logits]"), env_dir=kdl_env, check=False)
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and f"it wants a key: export {KEY_ENV}=<key>" in line, line


def test_k_above_the_cap_is_refused_before_any_request_and_leaves_no_folder(env, generator):
    with OpenAICompatibleServer(generator, "tiny") as server:
        done = kdl(*served(server, "vllm", 25), env_dir=env, check=False)
        assert done.returncode == 1 and "is above teacher.max_logprobs=20" in done.stderr
        assert server.completion_requests == [] and server.authorizations == []
    assert not list((env / "artifacts").glob("teacher_logits/*"))


def test_a_server_that_is_down_is_given_up_within_the_stated_budget(env):
    import time

    start = time.perf_counter()
    args = [a for a in served_args(f"http://127.0.0.1:{free_port()}/v1") if "max_retries" not in a]
    done = kdl(*args, "teacher.max_retries=20", "teacher.connect_budget_s=3", env_dir=env, check=False)
    seconds = time.perf_counter() - start
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "cannot be reached after" in line and "teacher.connect_budget_s=3" in line
    assert seconds < 30 and "resumes from the finished shards" in line  # an offline store resumes


def served_args(url: str) -> list[str]:
    return [
        "teacher-logits", "experiment=tiny", "teacher=served", f"teacher.base_url={url}", "teacher.model=tiny",
        "teacher.api=vllm", "estimator.teacher_targets.k=8", "teacher.backoff_s=0.5",
    ]  # fmt: skip


@pytest.mark.parametrize("traceback", ["", "1"], ids=["one-line", "KDL_TRACEBACK=1"])
def test_no_secret_reaches_the_terminal_or_any_written_file(kdl_env, generator, traceback):
    """A failing served run with a key in the environment and credentials in its URL: neither appears on
    stdout, stderr (Hydra's own error lines and the traceback included) or in any file the run wrote."""
    key, password = "sk-envkey-5a1f9c2e7b", "sk-urlpass-83be61d0c4"
    with OpenAICompatibleServer(generator, "tiny", api_key="something-else") as server:
        url = server.url.replace("http://", f"http://user:{password}@")
        done = kdl_process(
            *served_args(url), "teacher.max_retries=0", env_dir=kdl_env, check=False,
            env={KEY_ENV: key, "KDL_TRACEBACK": traceback, "KDL_TINY": os.environ["KDL_TINY"]},
        )  # fmt: skip
    assert done.returncode != 0
    assert ("Traceback" in done.stderr) == bool(traceback)
    printed = done.stdout + done.stderr
    assert key not in printed and password not in printed and "***" in printed
    for path in kdl_env.rglob("*"):
        if path.is_file():
            text = path.read_bytes().decode("utf-8", errors="replace")
            assert key not in text and password not in text, path


def test_online_and_offline_rows_of_a_served_teacher_hold_the_same_values():
    """One row dtype: the rows a step reads online are the float16 probabilities (and float32 tail) an
    offline store of the same answers keeps, not a float32 copy that differs in the fourth decimal."""
    from kd_lightning.teachers.served import rows_of_entries

    entries = [{"5": -0.1053605, "9": -2.5}, {"2": -0.0001, "7": -9.2}]
    ids, probs, tail = rows_of_entries(entries, 2, None)
    assert ids.tolist() == [[5, 9], [2, 7]] and probs.dtype == np.float16 and tail.dtype == np.float32
    np.testing.assert_array_equal(probs, probs.astype(np.float16))  # what the offline writer stores
    expected = np.clip(1 - np.exp([[-0.1053605, -2.5], [-0.0001, -9.2]]).sum(1), 0, 1)
    np.testing.assert_allclose(tail, expected, atol=1e-6)
