"""Batched, KV-cached chat generation with a local Hugging Face model.

Shared by the local teacher backend and the loopback OpenAI-compatible server, so both answer a
conversation the same way: chat template with the generation prompt, left padding (every prompt ends
where generation starts), stop at any end-of-turn token, and optional top-k log-probabilities of the
model's *untempered* distribution at each generated position (what an API's ``top_logprobs`` reports).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from kd_lightning.models.forward import left_pad

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class TokenLogprob:
    """One generated token with the top alternatives of the model's distribution at that position."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Completion:
    """A generated answer and the token counts an API would bill."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens reached)
    logprobs: list[TokenLogprob] | None = None


def stop_token_ids(tokenizer, model: nn.Module | None = None) -> list[int]:
    """Every id that ends a turn: eos, the generation config's eos, and known end-of-turn tokens."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in (configured if isinstance(configured, list) else [configured]))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(ids)


def render_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a conversation with the assistant's generation prompt appended."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the local teacher's tokenizer has no chat template; use an instruction-tuned model folder "
            "(its tokenizer_config.json must define chat_template)"
        )
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class ChatGenerator:
    """Answers batches of conversations with a local causal LM (eval mode, no grad)."""

    def __init__(self, model: nn.Module, tokenizer, max_prompt_tokens: int = 2048) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0])

    @torch.no_grad()
    def generate(
        self,
        conversations: Sequence[Sequence[dict[str, str]]],
        max_new_tokens: int,
        generation_temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        top_logprobs: int = 0,
    ) -> list[Completion]:
        """One completion per conversation; ``generation_temperature == 0`` means greedy decoding."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        if generation_temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(
                f"generation_temperature={generation_temperature} must be ≥ 0 and top_p={top_p} in (0, 1]"
            )
        prompts = [render_prompt(self.tokenizer, c) for c in conversations]
        too_long = [len(p) for p in prompts if len(p) > self.max_prompt_tokens]
        if too_long:
            raise ValueError(
                f"a prompt has {too_long[0]} tokens, more than max_prompt_tokens={self.max_prompt_tokens}; "
                "shorten it or raise the limit"
            )
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids, attention = left_pad(prompts, self.pad_id)
        sample = generation_temperature > 0
        if seed is not None:
            torch.manual_seed(seed)
        output = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            do_sample=sample,
            temperature=generation_temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.stop_ids,
            return_dict_in_generate=True,
            output_logits=top_logprobs > 0,
        )
        new_tokens = output.sequences[:, width:].cpu()
        stops = torch.tensor(self.stop_ids)
        completions = []
        for row, prompt in enumerate(prompts):
            ids = new_tokens[row].tolist()
            is_stop = torch.isin(new_tokens[row], stops)
            stopped = bool(is_stop.any())
            length = int(is_stop.int().argmax()) if stopped else len(ids)
            kept = ids[:length]
            logprobs = None
            if top_logprobs > 0:
                logprobs = []
                for step, token_id in enumerate(kept):
                    dist = torch.log_softmax(output.logits[step][row].float().cpu(), dim=-1)
                    values, alt = torch.topk(dist, k=min(top_logprobs, dist.shape[-1]))
                    logprobs.append(
                        TokenLogprob(
                            token=self.tokenizer.decode([token_id]),
                            logprob=float(dist[token_id]),
                            top=[
                                (self.tokenizer.decode([a]), float(v))
                                for a, v in zip(alt.tolist(), values.tolist())
                            ],
                        )
                    )
            completions.append(
                Completion(
                    text=self.tokenizer.decode(kept, skip_special_tokens=True).strip(),
                    prompt_tokens=len(prompt),
                    completion_tokens=length + int(stopped),
                    finish_reason="stop" if stopped else "length",
                    logprobs=logprobs,
                )
            )
        return completions
