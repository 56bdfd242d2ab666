"""ShareGPT as a closed teacher's corpus: the streaming reader (and its cut), multi-turn records, the split
by conversation, history that is trimmed to fit, the prior's own length cap, and a paper_small-shaped run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lightning.data import sharegpt
from kd_lightning.data.chat_encoding import FALLBACK_PROMPT
from kd_lightning.data.records import Record, read_sharegpt, split_records
from kd_lightning.data.sharegpt import ShareGPTError, ShareGPTReport, read_conversations, sharegpt_rows
from kd_lightning.data.tokenized import prompt_and_response_ids, tokenize_records
from tests.helpers.cli import artifacts, kdl

CONVERSATIONS = [
    {
        "id": "aaa_0",
        "conversations": [
            {"from": "human", "value": "What is a prior? 😀"},
            {"from": "gpt", "value": "A distribution before the evidence, é."},
            {"from": "human", "value": "And a posterior?"},
            {"from": "gpt", "value": "The prior updated by the evidence."},
        ],
    },
    {"id": "aaa_1", "conversations": [{"from": "gpt", "value": "continued from the previous chunk"}]},
    {
        "id": "bbb_0",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Name a colour."},
            {"from": "gpt", "value": "Blue."},
            {"from": "gpt", "value": "Or red."},
        ],
    },
]


def write_sharegpt(path: Path, conversations: list[dict], cut: bool = True) -> Path:
    """A ShareGPT-format array; with ``cut``, a last conversation stops mid-string, as the wheel's file does."""
    text = "[\n" + ",\n".join(json.dumps(c, ensure_ascii=False, indent=2) for c in conversations)
    if cut:
        text += ',\n  {"id": "ccc_0", "conversations": [{"from": "human", "value": "this record is cu'
    else:
        text += "\n]\n"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("chunk", [1 << 20, 7], ids=["one-chunk", "7-byte-chunks"])
def test_the_reader_streams_every_complete_conversation_and_counts_the_cut(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sharegpt, "CHUNK_BYTES", chunk)  # chunks split characters and records everywhere
    path = write_sharegpt(tmp_path / "sg.json", CONVERSATIONS)
    report = ShareGPTReport()
    found = list(read_conversations(path, report))
    assert [c["id"] for c in found] == ["aaa_0", "aaa_1", "bbb_0"]
    assert found[0]["conversations"][0]["value"] == "What is a prior? 😀"
    cut = path.read_bytes()[path.read_bytes().rindex(b'{"id": "ccc_0"') :]
    assert report.conversations == 3 and report.cut_bytes == len(cut)
    whole = ShareGPTReport()
    assert (
        len(list(read_conversations(write_sharegpt(tmp_path / "w.json", CONVERSATIONS, False), whole))) == 3
    )
    assert whole.cut_bytes == 0


def test_a_malformed_file_is_one_error_naming_it(tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "an array"}')
    with pytest.raises(ShareGPTError, match=r"bad\.json: expected a JSON array of conversations"):
        list(read_conversations(bad, ShareGPTReport()))
    monkeypatch.setattr(sharegpt, "CHUNK_BYTES", 16)
    monkeypatch.setattr(sharegpt, "MAX_RECORD_BYTES", 64)
    broken = tmp_path / "broken.json"
    broken.write_text(
        "[" + json.dumps(CONVERSATIONS[0]) + ", {oops} " + json.dumps(CONVERSATIONS[2]) * 5 + "]"
    )
    with pytest.raises(ShareGPTError, match="no conversation decodes at character"):
        list(read_conversations(broken, ShareGPTReport()))


def test_each_chatgpt_turn_is_a_record_with_its_conversation_as_the_prompt(tmp_path):
    rows, report = sharegpt_rows(write_sharegpt(tmp_path / "sg.json", CONVERSATIONS))
    assert report.chatgpt_turns == 5 and report.records == 3 and report.no_prompt == 2
    assert report.conversations == 3 and report.cut_bytes > 0
    first, second, third = rows
    assert (first["instruction"], first["history"]) == ("What is a prior? 😀", [])
    assert second["instruction"] == "And a posterior?"
    assert second["history"] == [
        {"role": "user", "content": "What is a prior? 😀"},
        {"role": "assistant", "content": "A distribution before the evidence, é."},
    ]
    assert third["system"] == "Be brief." and third["response"] == "Blue."
    assert {r["group"] for r in rows} == {"aaa", "bbb"}  # chunks of one conversation share a group
    records = read_sharegpt(tmp_path / "sg.json")
    assert records[1].history == (
        ("user", "What is a prior? 😀"),
        ("assistant", "A distribution before the evidence, é."),
    )
    assert records[0].key != records[1].key and records[1].group == "aaa"


def test_the_split_holds_whole_conversations_out():
    records = [
        Record(instruction=f"q{t}", response="a", history=(("user", "x"),) * t, group=f"conv{c}")
        for c in range(12)
        for t in range(1 + c % 3)
    ]
    train, held = split_records(records, 5)
    assert len(held) >= 5
    assert not {r.group for r in train} & {r.group for r in held}
    assert len(train) + len(held) == len(records)
    again, _ = split_records(list(reversed(records)), 5)  # independent of file order
    assert {r.key for r in again} == {r.key for r in train}


def test_history_is_rendered_and_the_oldest_turns_are_dropped_to_fit(tiny_dir):
    from kd_lightning.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_dir)
    turns = tuple(("user" if i % 2 == 0 else "assistant", f"turn {i} " + "word " * 12) for i in range(8))
    record = Record(instruction="last question", response="the answer " * 3, history=turns)
    prompt, response = prompt_and_response_ids(record, tokenizer)
    text = tokenizer.decode(prompt).replace(" ", "")  # a character tokenizer: decoded with spaces between
    assert "turn0" in text and "turn7" in text and text.index("turn0") < text.index("lastquestion")
    cap = len(response) + (len(prompt) * 2) // 3
    corpus = tokenize_records([record], tokenizer, cap)
    kept = tokenizer.decode(corpus.sequence(0)[: corpus.prompt_lens[0]]).replace(" ", "")
    assert corpus.report.history_trimmed == 1 and corpus.report.truncated == 0  # the answer stays whole
    assert "turn0" not in kept and "turn7" in kept and "lastquestion" in kept
    assert len(corpus.sequence(0)) <= cap
    assert corpus.record_keys == [record.key]  # the key stays the whole conversation's


def test_a_tokenizer_without_a_template_renders_the_turns_in_the_fallback_format(tiny_dir):
    from kd_lightning.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_dir)
    tokenizer.chat_template = None
    record = Record(instruction="second", response="ok", history=(("user", "first"), ("assistant", "reply")))
    prompt, _ = prompt_and_response_ids(record, tokenizer)
    expected = "### Instruction:\nfirst\n\n### Response:\nreply\n\n" + FALLBACK_PROMPT.format(
        instruction="second"
    )
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    assert prompt == bos + tokenizer(expected, add_special_tokens=False)["input_ids"]


def sharegpt_corpus(path: Path, conversations: int = 40) -> Path:
    rng = np.random.default_rng(0)
    words = ["the", "prior", "posterior", "teacher", "student", "counts", "evidence", "model", "text"]
    items = []
    for c in range(conversations):
        messages = []
        for _ in range(1 + c % 3):
            messages.append({"from": "human", "value": " ".join(rng.choice(words, 6)) + "?"})
            messages.append({"from": "gpt", "value": " ".join(rng.choice(words, int(rng.integers(20, 60))))})
        items.append({"id": f"c{c}_0", "conversations": messages})
    return write_sharegpt(path, items)


def test_plan_prints_the_teacher_text_the_prior_counts_at_its_own_cap(kdl_env):
    path = sharegpt_corpus(kdl_env / "sg.json")
    args = [*sharegpt_args(path), "data.max_seq_len=96", "data.count_max_seq_len=512"]
    done = kdl("plan", *args, env_dir=kdl_env)
    result = json.loads(next((kdl_env / "outputs").rglob("plan_result.json")).read_text())
    counted, trained = result["corpus"]["prior_counted_tokens"], result["corpus"]["target_positions"]
    assert counted > trained  # long answers are cut at 96 for the students, counted up to 512
    assert "teacher text counted by the prior" in done.stdout and "data.count_max_seq_len=512" in done.stdout
    kdl("prior", *args, env_dir=kdl_env)
    (prior,) = artifacts(kdl_env, "prior")
    meta = json.loads((prior / "meta.json").read_text())
    corpus = next(iter(artifacts(kdl_env, "corpus")))
    assert (corpus / "counts").is_dir()
    from kd_lightning.data.tokenized import TokenizedCorpus

    assert meta["provenance"]["counts"] == TokenizedCorpus.load(corpus / "counts").fingerprint


def sharegpt_args(path: Path) -> list[str]:
    return [
        "experiment=tiny",
        "data=sharegpt",
        f"data.path={path}",
        "data.heldout_size=6",
        "tokenizer.path=${kdl_tiny:}",
    ]


@pytest.mark.slow
def test_a_paper_small_shaped_run_seeds_proxies_sets_and_paired_intervals(kdl_env, tiny_dir):
    """The shape of experiment=paper_small on tiny models: an untrained row, seeds, a variant with its own
    proxy, a second held-out set, and the paired comparison against SFT."""
    path = sharegpt_corpus(kdl_env / "sg.json", conversations=30)
    conf = kdl_env / "my_conf" / "experiment"
    conf.mkdir(parents=True)
    other = kdl_env / "other_proxy"
    import shutil

    shutil.copytree(tiny_dir, other)
    (conf / "small.yaml").write_text(
        f"""# @package _global_
defaults:
  - tiny
  - override /data: sharegpt
  - _self_
data: {{path: {path}, heldout_size: 6, max_seq_len: 96, count_max_seq_len: 256}}
seeds: [0, 1]
evaluate_students: true
compare_to: sft
evaluation: {{generation_limit: 4, max_new_tokens: 6, semantic_similarity: true, question_sets: []}}
evaluation_sets:
  tiny_text: {{_target_: kd_lightning.data.corpus.CorpusSpec, source: jsonl, path: "{tiny_dir}/corpus.jsonl",
              heldout_size: 5, max_seq_len: 96}}
trainer: {{precision: bf16-mixed}}
variants:
  untrained: {{loss: [hard_ce], trainer: {{max_steps: 0}}, seeds: [0]}}
  sft: [hard_ce]
  prior_posterior: [hard_ce, prior_kl, posterior_kl]
  prior_posterior_other: {{loss: [hard_ce, prior_kl, posterior_kl], proxy: {{path: {other}, own_tokenizer: false}}}}
"""
    )
    searchpath = f"hydra.searchpath=[file://{kdl_env / 'my_conf'}]"
    kdl("pipeline", "experiment=small", searchpath, env_dir=kdl_env)
    out = next((kdl_env / "outputs").rglob("pipeline_result.json")).parent
    result = json.loads((out / "pipeline_result.json").read_text())
    comparison = {(r["heldout"], r["variant"]): r for r in result["comparison"]}
    assert set(comparison) == {
        (s, v)
        for s in ("heldout", "tiny_text")
        for v in ("untrained", "sft", "prior_posterior", "prior_posterior_other")
    }
    assert comparison["heldout", "sft"]["seeds"] == 2 and comparison["heldout", "untrained"]["seeds"] == 1
    row = comparison["heldout", "prior_posterior"]
    for key in ("nll", "rouge_l", "similarity", "answer_tokens"):
        assert row[f"{key}_diff_low"] <= row[f"{key}_diff"] <= row[f"{key}_diff_high"]
    assert "nll_diff" not in comparison["heldout", "sft"]  # the reference is not compared with itself
    for name in ("comparison.md", "comparison.csv", "per_prompt.csv"):
        assert (out / name).is_file()
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(artifacts(kdl_env, "posterior")) == 2 and len(artifacts(kdl_env, "align")) == 2  # two proxies
    assert len(artifacts(kdl_env, "distill")) == 1 + 2 * 3  # untrained once, three variants × two seeds


def test_bootstrap_interval_of_the_mean():
    from kd_lightning.evaluation.comparison import bootstrap_interval

    assert bootstrap_interval([0.5] * 20) == (0.5, 0.5, 0.5)
    mean, low, high = bootstrap_interval(np.random.default_rng(0).normal(1.0, 1.0, 400), resamples=4000)
    assert low < mean < high and low > 0.8 and high < 1.2 and abs(high - low - 2 * 1.96 / 20) < 0.03


def test_bf16_on_a_cpu_without_bf16_units_falls_back_to_fp32_with_one_line(caplog):
    from kd_lightning.cli import trainer

    trainer._WARNED.clear()
    with caplog.at_level(logging.WARNING):
        assert trainer.checked_precision("cpu", "bf16-mixed", has_bf16_units=False) == "32-true"
        assert trainer.checked_precision("cpu", "bf16-mixed", has_bf16_units=False) == "32-true"
    assert len([r for r in caplog.records if "no bf16 units" in r.message]) == 1
    assert trainer.checked_precision("cpu", "bf16-mixed", has_bf16_units=True) == "bf16-mixed"
    assert trainer.checked_precision("gpu", "bf16-mixed", has_bf16_units=False) == "bf16-mixed"
    assert trainer.checked_precision("cpu", "32-true", has_bf16_units=False) == "32-true"


def test_bf16_autocast_steps_match_fp32_within_tolerance():
    """Three training steps of a small Llama under CPU bf16 autocast against fp32: the loss within 1% and
    the gradients pointing the same way (cosine > 0.99) at every step."""
    from kd_lightning.models.builders import tiny_llama

    def run(bf16: bool) -> list[tuple[float, torch.Tensor]]:
        model = tiny_llama(512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
        steps = []
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            steps.append(
                (float(loss.detach()), torch.cat([p.grad.flatten().float() for p in model.parameters()]))
            )
            optimizer.step()
        return steps

    for (loss32, grad32), (loss16, grad16) in zip(run(False), run(True)):
        assert abs(loss16 - loss32) / loss32 < 0.01
        assert float(torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)) > 0.99
