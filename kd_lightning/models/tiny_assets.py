"""Tiny assets built in-process: a character-level tokenizer with a chat template, a 2-layer Llama
proxy and a synthetic teacher corpus. Unit tests, the tiny experiment and the notebooks use them; nothing
is downloaded.
"""

from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from kd_lightning.atomic import atomic_folder
from kd_lightning.environment import env_setting
from kd_lightning.models.builders import tiny_llama
from kd_lightning.models.shipped import assets_dir

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = list(string.ascii_lowercase + string.digits + " .,?!:'\n")
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|end|>"
    "{% else %}{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the teacher", "a robot"]
VERBS = ["sees", "likes", "finds", "helps", "follows", "draws"]
OBJECTS = ["the ball", "a tree", "the moon", "a book", "the river", "an apple"]


def char_tokenizer(specials_first: bool = True) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (specials + lowercase, digits, punctuation) with a chat template.

    ``specials_first=False`` puts the characters first, so id 0 is ``a``, a real text token (as ``!`` is in
    GPT-2, Llama 3 and Qwen vocabularies): tests use it to catch id-0 padding bugs.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS if specials_first else CHARS + SPECIALS)}
    model = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    specials = "|".join(Regex_escape(s) for s in SPECIALS)
    model.pre_tokenizer = pre_tokenizers.Split(Regex(f"{specials}|."), behavior="isolated")
    model.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def Regex_escape(text: str) -> str:
    return "".join("\\" + c if c in "|<>/" else c for c in text)


def synthetic_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Instruction/response pairs with learnable regularities (a small grammar and counting). Every prompt
    is distinct (it names its item), so no held-out or validation record repeats a training prompt."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            k = rng.randint(1, 5)
            start = rng.randint(0, 4)
            rows.append(
                {
                    "instruction": f"item {i}: count {k} from {start}.",
                    "response": " ".join(str(start + j) for j in range(k)) + ".",
                }
            )
        else:
            s, v, o = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
            rows.append(
                {
                    "instruction": f"item {i}: say something about {s.split()[-1]}.",
                    "response": f"{s} {v} {o}.",
                }
            )
    return rows


def synthetic_questions(n: int = 12, seed: int = 0) -> list[dict]:
    """Yes/no questions in the evals format about the counting grammar (for question-set plumbing)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"input": f"is {a} more than {b}? answer yes or no.", "ideal": "yes" if a > b else "no"})
    return rows


def build_tiny_assets(
    folder: str | os.PathLike,
    num_records: int = 96,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Path:
    """Write a tiny proxy model + tokenizer (an HF folder), ``corpus.jsonl`` and ``questions.jsonl``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or char_tokenizer()
    tokenizer.save_pretrained(folder)
    model = tiny_llama(
        len(tokenizer), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=seed
    )
    model.save_pretrained(folder)
    with (folder / "corpus.jsonl").open("w") as handle:
        for row in synthetic_records(num_records, seed):
            handle.write(json.dumps(row) + "\n")
    with (folder / "questions.jsonl").open("w") as handle:
        for row in synthetic_questions(seed=seed):
            handle.write(json.dumps({**row, "choices": ["yes", "no"]}) + "\n")
    return folder


def tiny_assets_folder() -> Path:
    """``$KDL_TINY``, or tiny assets built once under the assets folder (``experiment=tiny`` works anywhere).

    Built in a hidden sibling and renamed into place, so a killed or concurrent build never leaves half.
    """
    explicit = env_setting("KDL_TINY")
    if explicit:
        return Path(explicit).expanduser()
    target = assets_dir() / "tiny-2"  # 0.2.0: every prompt distinct (an older tiny corpus repeats them)
    if (target / "corpus.jsonl").is_file():
        return target
    with atomic_folder(target, keep_existing=True) as tmp:  # another process may finish first
        build_tiny_assets(tmp)
    return target
