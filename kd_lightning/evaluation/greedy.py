"""Batched greedy generation from token-id prompts (ROUGE-L generations, question answering)."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from kd_lightning.models.forward import left_pad


@torch.inference_mode()
def generate_greedy(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generate",
) -> list[str]:
    """Greedy replies (special tokens dropped, stripped) to token-id prompts, batched and left-padded."""
    device = next(model.parameters()).device
    pad_id = int(tokenizer.pad_token_id)
    replies = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids, attention = left_pad(chunk, pad_id, device)  # every prompt ends where generation starts
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        replies += tokenizer.batch_decode(output[:, width:].cpu(), skip_special_tokens=True)
    return [r.strip() for r in replies]
