"""Training a module outside a Trainer, for tests that check what a few steps do."""

from __future__ import annotations


def fit_one_batch(module, batch, steps: int) -> list[float]:
    """Run ``steps`` optimizer steps of a DistillModule on one batch, outside a Trainer; returns the losses."""
    optimizer = module.configure_optimizers()
    module.on_fit_start()
    losses = []
    for _ in range(steps):
        logits, packed = module.student_logits(batch)
        loss = sum(w * v for w, v in module.compute_terms(logits, packed).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
