"""A served teacher's scoring throughput, and the bytes it puts on the wire.

``teacher=served`` reads each sequence's prompt log-probs (top 20, the usual server cap) over HTTP. This
times scoring the same sequences three ways on this machine: in process (batched forwards + top-k, what an
in-process teacher's store does), and through the loopback server in vLLM's wire form at client concurrency
1, 4 and 16 (the server batches concurrent requests into one forward, as vLLM does). The loopback server
runs in this process on the same cores, so the gap to in-process is the protocol's cost: JSON of 20 entries
per token, HTTP, and the batching wait. Bytes on the wire are counted in both wire forms (vLLM's
``prompt_logprobs`` and the OpenAI completions ``echo``). Models: the tiny one (its synthetic corpus) and
SmolLM2-135M-Instruct (held-out gpt-3.5 answers; skipped where not installed). Ends with one JSON line.

    python benchmarks/bench_served_teacher.py [--sequences 32] [--max-seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from _isolated import parse_args

from kd_lightning.data.records import load_records, split_records
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.estimation.teacher_targets import text_of
from kd_lightning.models.chat import ChatGenerator
from kd_lightning.models.loading import freeze, load_causal_lm, load_tokenizer
from kd_lightning.models.shipped import AssetError
from kd_lightning.models.tiny_assets import build_tiny_assets
from kd_lightning.teachers.served import ServedTeacher
from kd_lightning.teachers.server import OpenAICompatibleServer

K = 20
CONCURRENCY = (1, 4, 16)
KEY_ENV = "KDL_BENCH_TEACHER_KEY"
JSON_KEYS = ("bench", "k", "batch", "models")  # models: one entry per model, figures and ratios inside


def in_process(model: torch.nn.Module, sequences: list[list[int]], batch: int) -> float:
    """Seconds to score ``sequences`` in process: right-padded forwards of ``batch``, top-k of each row."""
    start = time.perf_counter()
    for first in range(0, len(sequences), batch):
        group = sequences[first : first + batch]
        longest = max(map(len, group))
        ids = torch.zeros((len(group), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(group):
            ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits
        for row, seq in enumerate(group):
            torch.log_softmax(logits[row, : len(seq) - 1].float(), -1).topk(K, dim=-1)
    return time.perf_counter() - start


def served(server: OpenAICompatibleServer, name: str, sequences, texts, api: str, concurrency: int) -> float:
    teacher = ServedTeacher(server.url, name, api=api, api_key_env=KEY_ENV, max_concurrency=concurrency)
    start = time.perf_counter()
    scored = teacher.score(sequences, texts, K)
    seconds = time.perf_counter() - start
    assert [len(s) for s in scored] == [len(s) for s in sequences], "every position scored"
    return seconds


def bench_model(label: str, path: str, source: str, data_path: str | None, args) -> dict:
    tokenizer = load_tokenizer(path)
    model = freeze(load_causal_lm(path))
    records = load_records(source, data_path)
    _, heldout = split_records(records, min(len(records) // 2, 100))
    corpus = tokenize_records(heldout[: args.sequences], tokenizer, args.max_seq_len)
    sequences = [corpus.sequence(i).tolist() for i in range(len(corpus))]
    texts = [text_of(tokenizer)(s) for s in sequences]  # what the openai_completions form sends
    tokens = sum(map(len, sequences))
    in_process(model, sequences[: args.batch], args.batch)  # warm-up
    figures: dict = {"model": label, "sequences": len(sequences), "tokens": tokens}
    local = min(in_process(model, sequences, args.batch) for _ in range(args.repeats))
    figures["in_process_tokens_per_s"] = round(tokens / local, 1)
    with OpenAICompatibleServer(ChatGenerator(model, tokenizer), label, max_batch_size=args.batch) as server:
        served(server, label, sequences[:2], texts[:2], "vllm", 1)  # warm-up
        for concurrency in CONCURRENCY:
            seconds = min(
                served(server, label, sequences, texts, "vllm", concurrency) for _ in range(args.repeats)
            )
            figures[f"served_c{concurrency}_tokens_per_s"] = round(tokens / seconds, 1)
            figures[f"served_c{concurrency}_vs_in_process"] = round(local / seconds, 3)
        for api in ("vllm", "openai_completions"):
            server.wire_bytes.update(request=0, reply=0)
            served(server, label, sequences, texts, api, 4)
            figures[f"{api}_request_bytes_per_token"] = round(server.wire_bytes["request"] / tokens, 1)
            figures[f"{api}_reply_bytes_per_token"] = round(server.wire_bytes["reply"] / tokens, 1)
    print(
        f"{label}: {tokens} tokens; in process {figures['in_process_tokens_per_s']:.0f} tok/s; served "
        + ", ".join(f"c={c} {figures[f'served_c{c}_tokens_per_s']:.0f} tok/s" for c in CONCURRENCY)
        + f"; wire per token: vllm {figures['vllm_reply_bytes_per_token']:.0f} B, openai_completions "
        f"{figures['openai_completions_reply_bytes_per_token']:.0f} B (replies)",
        flush=True,
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="in-process batch = the server's max batch")
    parser.add_argument("--repeats", type=int, default=2)
    args = parse_args(parser, {"sequences": 4, "max_seq_len": 48, "batch": 4, "repeats": 1})
    os.environ[KEY_ENV] = "EMPTY"  # the loopback server asks for no key
    models = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_assets(Path(tmp))
        models.append(bench_model("tiny", str(tiny), "jsonl", str(tiny / "corpus.jsonl"), args))
        if not args.smoke:
            try:
                models.append(bench_model("smollm2", "smollm2", "alpaca_gpt35", None, args))
            except AssetError as err:
                print(f"SmolLM2 skipped: {err}")
    print(json.dumps({"bench": "served_teacher", "k": K, "batch": args.batch, "models": models}))


if __name__ == "__main__":
    main()
