"""GAD's discriminator: a causal LM's decoder with a scalar head on the last real token of a sequence."""

from __future__ import annotations

import copy

import torch
from torch import nn

from kd_lightning.models.loading import load_causal_lm


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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) scores of (B, L) sequences."""
        mask = attention_mask.long()
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self.backbone.get_decoder()(
            input_ids=input_ids, attention_mask=mask, position_ids=positions
        ).last_hidden_state
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
        return self.head(hidden[torch.arange(len(last), device=hidden.device), last].float()).squeeze(-1)
