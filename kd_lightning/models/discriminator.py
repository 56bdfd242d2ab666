"""GAD's discriminator: a causal LM's decoder with a scalar head on the last real token of a sequence."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kd_lightning.models.loading import load_causal_lm

HEAD_FILE = "score_head.safetensors"
"""Beside the backbone's HF files in a saved discriminator's folder: the scalar head's weight and bias."""


class SequenceScorer(nn.Module):
    """``D(prompt, answer)``: the decoder's hidden state at the sequence's last real token, through a linear
    head to one number. Reads left-padded rollouts and right-padded teacher text alike (the attention mask
    says which tokens are real; positions count real tokens only).

    Args:
        backbone: a Hugging Face causal LM (its decoder is used; the LM head is not).
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        if not hasattr(backbone, "get_decoder"):
            raise TypeError("the GAD discriminator needs an HF causal LM (get_decoder) as its backbone")
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.config.hidden_size), 1)
        nn.init.zeros_(self.head.weight)  # every answer scores alike at the start
        nn.init.zeros_(self.head.bias)

    @classmethod
    def copy_of(cls, model: nn.Module) -> SequenceScorer:
        """A discriminator from a copy of ``model``'s current weights (GAD's default: the warm student)."""
        return cls(copy.deepcopy(model))

    @classmethod
    def from_path(cls, path: str) -> SequenceScorer:
        """A discriminator on another model (a model slot's path: ``smollm2``, a folder or a hub id)."""
        return cls(load_causal_lm(path))

    def save(self, folder: str | Path) -> None:
        """Write the discriminator to ``folder``: the backbone as an HF model, the head as ``score_head.safetensors``
        (read back by :meth:`load`; GAD saves its discriminator beside the student it trained)."""
        folder = Path(folder)
        self.backbone.save_pretrained(folder)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  str(folder / HEAD_FILE))  # fmt: skip

    @classmethod
    def load(cls, folder: str | Path) -> SequenceScorer:
        """A discriminator written by :meth:`save` (e.g. ``<a GAD student's folder>/discriminator``)."""
        folder = Path(folder)
        if not (folder / HEAD_FILE).is_file():
            raise FileNotFoundError(
                f"{folder} holds no saved discriminator ({HEAD_FILE} is missing): give the `discriminator` "
                "folder a GAD run saved beside its student, e.g. <artifacts>/distill/<key>/student/discriminator"
            )
        scorer = cls(load_causal_lm(folder))
        scorer.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
        return scorer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) scores of (B, L) sequences."""
        mask = attention_mask.long()
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self.backbone.get_decoder()(
            input_ids=input_ids, attention_mask=mask, position_ids=positions
        ).last_hidden_state
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
        return self.head(hidden[torch.arange(len(last), device=hidden.device), last].float()).squeeze(-1)
