"""Running a causal LM at the target positions only, and sharding a frozen model over ranks.

Distillation needs logits (N, V) at the N target positions of a batch, not (B, T, V) at every position:
on long prompts most positions are prompt or padding. These helpers run the decoder over the whole
sequence but the output head only where it is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def target_position_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Logits (N, V) at the ``positions`` (B, T) bool mask only: decoder → gather → output head.

    Prompt and padding positions never go through the vocabulary-sized head, which for small models is
    most of the compute. The shortcut is checked once per model against the full forward (a model that
    post-processes logits, e.g. with soft-capping, silently keeps the plain path).
    """
    shortcut = getattr(model, "_kdl_head_shortcut", None)
    if shortcut is None:
        shortcut = _check_head_shortcut(model, input_ids[:1, :8], attention_mask[:1, :8])
        object.__setattr__(model, "_kdl_head_shortcut", shortcut)
    if not shortcut:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[positions]
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return model.get_output_embeddings()(hidden[positions])


def target_position_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    hidden_layers: Sequence[int],
    head: bool = True,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Like :func:`target_position_logits`, plus hidden states of ``hidden_layers`` at the positions.

    Returns ``(out, {layer: (N, H)})`` where ``out`` is the logits (N, V), or with ``head=False`` the final
    hidden states (N, H) (for the fused loss path). Layers index HF's ``hidden_states`` tuple.
    """
    if not hasattr(model, "get_decoder"):
        raise TypeError("hidden-state distillation needs an HF causal LM (get_decoder/get_output_embeddings)")
    if getattr(model, "_kdl_head_shortcut", None) is False:  # e.g. a sharded teacher: only its full forward
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        layers = {layer: out.hidden_states[layer][positions] for layer in hidden_layers}
        return (out.logits[positions] if head else out.hidden_states[-1][positions]), layers
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    states = out.hidden_states
    layers = {layer: states[layer][positions] for layer in hidden_layers}
    last = out.last_hidden_state[positions]
    if not head:
        return last, layers
    shortcut = getattr(model, "_kdl_head_shortcut", None)
    if shortcut is None:
        shortcut = _check_head_shortcut(model, input_ids[:1, :8], attention_mask[:1, :8])
        object.__setattr__(model, "_kdl_head_shortcut", shortcut)
    if shortcut:
        return model.get_output_embeddings()(last), layers
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[positions], layers


def shard_frozen_model(model: nn.Module, device_type: str) -> nn.Module:
    """Shard a frozen model's parameters over the default process group (FSDP2 ``fully_shard``).

    Each decoder block is its own unit, so a forward gathers one block at a time: a rank holds 1/W of the
    weights at rest and about one block more while running. Only the model's full forward may be called
    afterwards (its root unit gathers the embeddings and head), so the head shortcut is switched off.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_frozen_model needs an initialised process group (a distributed strategy)")
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for block in getattr(decoder, "layers", None) or []:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    object.__setattr__(model, "_kdl_head_shortcut", False)
    return model


def _check_head_shortcut(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if get_decoder is None or head is None:
        return False
    try:
        with torch.no_grad():
            full = model(input_ids=input_ids, attention_mask=attention_mask).logits
            hidden = get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return bool(torch.allclose(head(hidden), full, atol=1e-4, rtol=1e-4))
    except Exception:  # any architecture that does not fit the pattern keeps the plain path
        return False
