"""Proxy agreement: the aligned proxy's probability of each observed teacher token (Proxy-KD's weights).

Proxy-KD (arXiv 2401.07013v2) trusts the proxy's soft labels where the proxy imitates the teacher well. The
paper weights by the proxy's alignment quality; its exact formula is not in the sources we could read, so we
take the reading the per-position form allows: ``a_t = p_proxy(y_t | y_<t)``, the probability the aligned
proxy gives the token the teacher actually wrote, and the loss term normalises it over each batch
(:func:`kd_lightning.losses.terms.agreement_weights`).

The store holds one entry per target position: the observed token with ``a_t``, and ``1 − a_t`` as its tail,
so it is an ordinary soft-label store (8 bytes per position) that the DataModule carries like any other and
that the weight reads with :func:`~kd_lightning.losses.terms.gold_probability`. It comes from one forward of
the same aligned proxy as the posterior, at temperature 1 (the proxy's own distribution, whatever the
posterior's sampling temperature).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kd_lightning.data.soft_labels import SoftLabelStore, SparseRows, id_dtype_for
from kd_lightning.data.store_format import StoreWrite
from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.estimation.sharded import estimate_by_shard, packing_settings


def observed_tokens(corpus: TokenizedCorpus, sequences: list[int]) -> np.ndarray:
    """The teacher's token at every target position of ``sequences``, in store row order."""
    return np.concatenate(
        [corpus.sequence(i)[int(corpus.prompt_lens[i]) :] for i in sequences] or [np.zeros(0, np.int64)]
    )


def agreement_rows(logits: torch.Tensor, observed: torch.Tensor, vocab_size: int) -> SparseRows:
    """Rows (N, 1) from the proxy's logits (N, V) at N positions and the observed tokens (N,): the observed
    token with its probability, the rest of the mass as the tail."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    p = log_probs.gather(-1, observed.long().unsqueeze(-1)).exp().clamp(0.0, 1.0)
    return SparseRows(
        observed.cpu().numpy().astype(id_dtype_for(vocab_size)).reshape(-1, 1),
        p.cpu().numpy().astype(np.float16),
        (1.0 - p[:, 0]).clamp_min(0.0).cpu().numpy().astype(np.float32),
    )


class ProxyAgreementEstimator:
    """Writes the proxy-agreement store for every target position of a corpus (resumable by shard).

    Args:
        batch_size: sequences per proxy forward.
        shard_size: sequences per resumable shard.
        packing, pack_length: pack each batch's sequences into rows (as ``datamodule.packing``).
        proxy_dtype: the proxy's weights in this pass (probabilities are computed in float32).
    """

    def __init__(
        self,
        batch_size: int = 8,
        shard_size: int = 64,
        packing: bool = False,
        pack_length: int | None = None,
        proxy_dtype: str = "float32",
    ) -> None:
        for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
            if value < 1:
                raise ValueError(f"the proxy-agreement pass needs {name} >= 1, got {value}")
        self.batch_size, self.shard_size = batch_size, shard_size
        self.packing, self.pack_length = packing, pack_length
        self.proxy_dtype = proxy_dtype

    @classmethod
    def like(cls, posterior) -> ProxyAgreementEstimator:
        """The pass that reads the proxy as ``posterior`` (a ProxyPosteriorEstimator) does: same batches,
        packing and dtype, so its rows match the posterior's positions and cost one more proxy forward."""
        return cls(
            posterior.batch_size, posterior.shard_size, posterior.packing, posterior.pack_length,
            posterior.proxy_dtype,
        )  # fmt: skip

    def settings(self) -> dict:
        return {
            "kind": "proxy_agreement",
            "batch_size": self.batch_size,  # which sequences share a batch changes float rounding
            **packing_settings(self.packing, self.pack_length),
            **({"proxy_dtype": self.proxy_dtype} if self.proxy_dtype != "float32" else {}),
        }

    def estimate(
        self,
        proxy: nn.Module,
        corpus: TokenizedCorpus,
        pad_id: int,
        vocab_size: int,
        out: str,
        provenance: dict,
        write: StoreWrite | None = None,
    ) -> SoftLabelStore:
        """Compute and write the store at ``out`` (in ``write``'s format); a killed run resumes at its first
        unfinished shard."""

        def rows_for(logits: torch.Tensor, seqs: list[int], generator: torch.Generator) -> SparseRows:
            observed = torch.from_numpy(observed_tokens(corpus, seqs).astype(np.int64)).to(logits.device)
            if len(observed) != logits.shape[0]:
                raise RuntimeError(
                    f"{len(observed)} teacher tokens for sequences {seqs}, proxy rows {logits.shape[0]}"
                )
            return agreement_rows(logits, observed, vocab_size)

        return estimate_by_shard(
            proxy, corpus, pad_id, out, provenance, self.shard_size, self.batch_size, 0,
            "proxy agreement", rows_for, self.packing, self.pack_length, write=write,
        )  # fmt: skip
