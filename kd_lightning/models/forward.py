"""Running a causal LM at the target positions only, and sharding a frozen model over ranks.

Distillation needs logits (N, V) at the N target positions of a batch, not (B, T, V) at every position:
on long prompts most positions are prompt or padding. These helpers run the decoder over the whole
sequence but the output head only where it is needed.

Packed rows (several records per row, ``position_ids`` restarting per record) are run with the position ids
and no attention mask: transformers then builds a block-diagonal causal mask (or uses a variable-length
attention kernel where one is installed), so no record attends to another. Each model is checked once
against separate forwards (:func:`check_packing`); a model that would mix records is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def model_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | bool | None]:
    """Keyword arguments of a forward: padded rows use the attention mask, packed rows their position ids."""
    if position_ids is None:
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    check_packing(model)
    return {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}


def check_packing(model: nn.Module) -> None:
    """Refuse a model whose packed forward differs from separate forwards (checked once per model).

    Two short records are run packed in one row and one by one. An architecture or attention kernel
    that ignores the position-id packing would let the second record see the first: that is wrong
    values, silently, so it is an error naming the fix.
    """
    if getattr(model, "_kdl_packing_ok", False):
        return
    device = next(model.parameters()).device
    vocab = int(model.get_input_embeddings().num_embeddings) if hasattr(model, "get_input_embeddings") else 8
    first = torch.arange(1, 6, device=device) % vocab
    second = torch.arange(7, 11, device=device) % vocab
    packed_ids = torch.cat([first, second])[None]
    positions = torch.cat([torch.arange(5), torch.arange(4)]).to(device)[None]
    training = model.training
    model.eval()  # no dropout in the comparison
    try:
        with torch.no_grad():
            packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits[0].float()
            alone = [model(input_ids=ids[None], use_cache=False).logits[0].float() for ids in (first, second)]
    finally:
        model.train(training)
    scale = max(1.0, float(torch.cat(alone).abs().max()))
    if not torch.allclose(packed, torch.cat(alone), atol=1e-3 * scale, rtol=1e-3):
        raise ValueError(
            f"{type(model).__name__} attends across packed records (its packed forward differs from separate "
            "forwards); set datamodule.packing=false for it"
        )
    object.__setattr__(model, "_kdl_packing_ok", True)


TRAINING_DECODER = "_kdl_training_decoder"
"""Attribute of a model holding its compiled decoder (see :func:`compile_for_training`); not a submodule, so
neither a checkpoint nor ``save_pretrained`` sees it."""


def compile_for_training(model: nn.Module, dynamic: bool | None = None) -> nn.Module:
    """Compile (``torch.compile``, inductor) the decoder that teacher-forced training steps run.

    Only the training forward uses it (the model in train mode, through :func:`target_position_logits` and
    :func:`target_position_states`): generation and evaluation keep the eager decoder, whose shapes change
    every step and would recompile. The compiled decoder shares the model's parameters. Returns it.
    """
    if not hasattr(model, "get_decoder"):
        raise TypeError("trainer.compile=true needs an HF causal LM (get_decoder) as the student")
    compiled = torch.compile(model.get_decoder(), dynamic=dynamic)
    object.__setattr__(model, TRAINING_DECODER, compiled)
    return compiled


def release_compiled(model: nn.Module) -> None:
    """Drop the compiled training decoder (after fit: the model is saved, copied and evaluated eagerly)."""
    if TRAINING_DECODER in model.__dict__:
        object.__delattr__(model, TRAINING_DECODER)
        # dynamo's caches hold the compiled graphs and, through their guards, this model: without a reset
        # every student of a pipeline stays in memory (about 2 GB each for SmolLM2). The next compile reads
        # inductor's on-disk cache, so it costs seconds, not the first compile's minutes.
        torch._dynamo.reset()


def _decoder(model: nn.Module) -> nn.Module:
    compiled = model.__dict__.get(TRAINING_DECODER)
    return compiled if compiled is not None and model.training else model.get_decoder()


def target_position_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    position_ids: torch.Tensor | None = None,
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
    inputs = model_inputs(model, input_ids, attention_mask, position_ids)
    if not shortcut:
        return model(**inputs).logits[positions]
    hidden = _decoder(model)(**inputs).last_hidden_state
    return model.get_output_embeddings()(hidden[positions])


def target_position_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    hidden_layers: Sequence[int],
    head: bool = True,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Like :func:`target_position_logits`, plus hidden states of ``hidden_layers`` at the positions.

    Returns ``(out, {layer: (N, H)})`` where ``out`` is the logits (N, V), or with ``head=False`` the final
    hidden states (N, H) (for the fused loss path). Layers index HF's ``hidden_states`` tuple.
    """
    if not hasattr(model, "get_decoder"):
        raise TypeError("hidden-state distillation needs an HF causal LM (get_decoder/get_output_embeddings)")
    inputs = model_inputs(model, input_ids, attention_mask, position_ids)
    if getattr(model, "_kdl_head_shortcut", None) is False:  # e.g. a sharded teacher: only its full forward
        out = model(**inputs, output_hidden_states=True)
        layers = {layer: out.hidden_states[layer][positions] for layer in hidden_layers}
        return (out.logits[positions] if head else out.hidden_states[-1][positions]), layers
    out = _decoder(model)(**inputs, output_hidden_states=True)
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
    return model(**inputs).logits[positions], layers


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


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (B, P) with every prompt ending in the last column."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (the chat template's generation prompt)")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention[row, width - len(prompt) :] = 1
    return ids.to(device), attention.to(device)
