"""Posterior soft labels: the prior updated with samples from an aligned proxy model.

At every teacher-forced position the proxy's next-token distribution ``p_proxy`` is computed once (one
forward over a batch of teacher sequences), ``R`` rounds are drawn from it in one ``torch.multinomial``
call, and an update rule turns (prior, draws) into the posterior. The rule is pluggable (a ``_target_``)
because the paper's exact form is not public. The default is the Dirichlet–multinomial posterior mean::

    p_post = (κ · p_prior + N) / (κ + R),   N = counts of the R draws

R = 0 gives the prior; R → ∞ gives ``p_proxy``. :class:`ExpectedCountsUpdate` uses ``N = R · p_proxy``
(the mean of the sampled rule, without its noise).

**A closed API's top-K log-probs as evidence** (``api_evidence_weight`` λ > 0, with ``data.logprobs``). The
Dirichlet prior is conjugate to any observation that adds pseudo-counts, and the API's answer at a position
is an observation of the teacher itself: its top-K probabilities and the rest of the mass (the tail, spread
evenly over the ids the API did not list, the store's tail rule), ``p_api``. Taken as λ pseudo-counts
distributed as ``p_api`` next to the proxy's R draws, the posterior mean is::

    p_post = (κ · p_prior + N_proxy + λ · p_api) / (κ + R + λ)

at the positions where the API's tokens aligned with the student's; every other position keeps the rule
above exactly. λ says how many proxy draws one API answer is worth: the API is the teacher, the proxy only
resembles it, so λ ≥ R is a natural start.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from kd_lightning.data.cross_tokenizer import MappedProxy
from kd_lightning.data.soft_labels import SoftLabelStore, SparseRows, id_dtype_for
from kd_lightning.data.store_format import StoreWrite
from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.estimation.sharded import estimate_by_shard, packing_settings, target_position_batches

log = logging.getLogger(__name__)


class DirichletUpdate:
    """Dirichlet–multinomial posterior mean with sampled counts.

    Args:
        concentration: κ > 0, the prior's weight in pseudo-counts (κ = R gives prior and draws equal say).
    """

    def __init__(self, concentration: float = 8.0) -> None:
        if concentration <= 0:
            raise ValueError(f"concentration (κ) must be > 0, got {concentration}")
        self.concentration = float(concentration)

    def settings(self) -> dict:
        return {
            "rule": f"{type(self).__module__}.{type(self).__qualname__}",
            "concentration": self.concentration,
        }

    def counts(
        self, proxy_probs: torch.Tensor, rounds: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """(N, V) counts of ``rounds`` draws per row of ``proxy_probs`` (N, V), all in one call."""
        counts = torch.zeros_like(proxy_probs)
        if rounds > 0:
            draws = torch.multinomial(proxy_probs, rounds, replacement=True, generator=generator)
            counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=counts.dtype))
        return counts

    def __call__(
        self,
        prior: torch.Tensor,
        proxy_probs: torch.Tensor,
        rounds: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Posterior (N, V) from a dense prior (N, V) and the proxy's distributions (N, V)."""
        posterior = self.counts(proxy_probs, rounds, generator)  # a fresh tensor: updated in place
        posterior.add_(prior, alpha=self.concentration)
        return posterior.div_(self.concentration + rounds)

    def from_counts(self, prior: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Posterior (N, V) from counts already in the prior's vocabulary (a foreign proxy's mapped
        draws), ``(κ·prior + N) / (κ + ΣN)``: a row with no count keeps the prior."""
        total = counts.sum(-1, keepdim=True)
        return (counts + self.concentration * prior) / (self.concentration + total)


class ExpectedCountsUpdate(DirichletUpdate):
    """Dirichlet posterior mean with expected counts ``N = R · p_proxy`` (no sampling noise)."""

    def counts(
        self, proxy_probs: torch.Tensor, rounds: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        return proxy_probs.mul(rounds)


class ProxyPosteriorEstimator:
    """Writes posterior soft labels for every target position of a corpus.

    Args:
        update: the update rule (default :class:`DirichletUpdate`).
        sampling_rounds: R, draws from the proxy per position.
        proxy_sampling_temperature: temperature of the proxy distribution that is sampled.
        top_k: entries stored per position.
        batch_size: sequences per proxy forward.
        shard_size: sequences per resumable shard.
        seed: sampling seed (each shard uses ``seed + shard``, so a resumed run draws the same samples).
        packing, pack_length: pack each batch's sequences into rows (``datamodule.packing``); the rows
            equal the padded ones to float tolerance and the draws follow the same order.
        proxy_dtype: the proxy's weights in the posterior pass (``bfloat16`` halves memory and time on
            GPUs; the probabilities are still computed in float32).
    """

    def __init__(
        self,
        update: DirichletUpdate | None = None,
        sampling_rounds: int = 16,
        proxy_sampling_temperature: float = 1.0,
        top_k: int = 32,
        batch_size: int = 8,
        shard_size: int = 64,
        seed: int = 0,
        packing: bool = False,
        pack_length: int | None = None,
        proxy_dtype: str = "float32",
        api_evidence_weight: float = 0.0,
    ) -> None:
        if proxy_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"estimator.posterior.proxy_dtype must be float32, bfloat16 or float16, got {proxy_dtype!r}"
            )
        if sampling_rounds < 0:
            raise ValueError(f"sampling_rounds must be >= 0, got {sampling_rounds}")
        if proxy_sampling_temperature <= 0:
            raise ValueError(f"proxy_sampling_temperature must be > 0, got {proxy_sampling_temperature}")
        for name, value in (("top_k", top_k), ("batch_size", batch_size), ("shard_size", shard_size)):
            if value < 1:
                raise ValueError(f"estimator.posterior.{name} must be >= 1, got {value}")
        self.update = update or DirichletUpdate()
        self.sampling_rounds = sampling_rounds
        self.proxy_sampling_temperature = proxy_sampling_temperature
        self.top_k = top_k
        self.batch_size = batch_size
        self.shard_size = shard_size
        self.seed = seed
        self.packing, self.pack_length = packing, pack_length
        self.proxy_dtype = proxy_dtype
        if api_evidence_weight < 0:
            raise ValueError(
                f"estimator.posterior.api_evidence_weight must be >= 0, got {api_evidence_weight}"
            )
        self.api_evidence_weight = float(api_evidence_weight)

    def with_changes(self, **changes) -> ProxyPosteriorEstimator:
        """A new estimator with these settings changed, checked like any other (e.g. another R)."""
        arguments = {
            "update": self.update,
            "sampling_rounds": self.sampling_rounds,
            "proxy_sampling_temperature": self.proxy_sampling_temperature,
            "top_k": self.top_k,
            "batch_size": self.batch_size,
            "shard_size": self.shard_size,
            "seed": self.seed,
            "packing": self.packing,
            "pack_length": self.pack_length,
            "proxy_dtype": self.proxy_dtype,
            "api_evidence_weight": self.api_evidence_weight,
        }
        return type(self)(**{**arguments, **changes})

    def settings(self) -> dict:
        return {
            "kind": "proxy_posterior",
            **self.update.settings(),
            "sampling_rounds": self.sampling_rounds,
            "proxy_sampling_temperature": self.proxy_sampling_temperature,
            "top_k": self.top_k,
            "seed": self.seed,
            # which sequences share a shard (its seed) and a batch (the order of draws) decide the draws
            "batch_size": self.batch_size,
            "shard_size": self.shard_size,
            **packing_settings(self.packing, self.pack_length),  # float rounding differs when packed
            **({"proxy_dtype": self.proxy_dtype} if self.proxy_dtype != "float32" else {}),
            **({"api_evidence_weight": self.api_evidence_weight} if self.api_evidence_weight else {}),
        }

    def proxy_distributions(
        self, proxy: nn.Module, corpus: TokenizedCorpus, sequences: range, pad_id: int
    ) -> Iterator[tuple[torch.Tensor, list[int]]]:
        """Yield (rows, V) proxy probabilities at the target positions of batches of ``sequences``."""
        batches = target_position_batches(
            proxy, corpus, sequences, pad_id, self.batch_size, self.packing, self.pack_length
        )
        for logits, batch_seqs in batches:
            yield torch.softmax(logits.float() / self.proxy_sampling_temperature, dim=-1), batch_seqs

    def posterior_rows(
        self,
        prior: SparseRows,
        proxy_probs: torch.Tensor,
        generator: torch.Generator,
        evidence: tuple[SparseRows, torch.Tensor] | None = None,
    ) -> SparseRows:
        """Posterior rows from the prior rows and the proxy's distributions (N, V); ``evidence``: an API's
        rows and (N,) bool, where they carry its distribution (weighted by ``api_evidence_weight``)."""
        vocab = proxy_probs.shape[-1]
        dense_prior = prior.to_dense(vocab).to(proxy_probs.device)
        if evidence is None or self.api_evidence_weight == 0:
            posterior = self.update(dense_prior, proxy_probs, self.sampling_rounds, generator)
        else:
            api_rows, present = evidence
            counts = self.update.counts(proxy_probs, self.sampling_rounds, generator)
            api = api_rows.to_dense(vocab).to(counts.device)
            counts += (self.api_evidence_weight * present.to(counts.dtype)).unsqueeze(-1) * api
            posterior = self.update.from_counts(
                dense_prior, counts
            )  # rows without evidence: (κ·prior + N)/(κ + R)
        return SparseRows.from_dense(posterior, self.top_k, id_dtype_for(vocab))

    def estimate(
        self,
        proxy: nn.Module,
        corpus: TokenizedCorpus,
        prior: SoftLabelStore,
        pad_id: int,
        out: str,
        provenance: dict,
        mapped: MappedProxy | None = None,
        api_evidence: SoftLabelStore | None = None,
        write: StoreWrite | None = None,
    ) -> SoftLabelStore:
        """Compute and write the posterior store at ``out``; resumes a killed run's finished shards.

        A proxy of another tokenizer (``mapped``) reads its own tokenization of ``corpus``; its draws are
        mapped into the student's vocabulary (:meth:`mapped_posterior_rows`). ``api_evidence``: a closed
        API's log-prob store over ``corpus``, counted with weight ``api_evidence_weight`` where it aligned.
        ``write``: the store's format (format 1 when absent).
        """
        if self.api_evidence_weight and api_evidence is None:
            raise ValueError(
                "estimator.posterior.api_evidence_weight > 0 counts a closed API's log-probs: set "
                "data.logprobs=<corpus folder>/logprobs.jsonl (kdl generate sampling.top_logprobs=K writes it)"
            )
        if mapped is not None:
            if self.api_evidence_weight:
                raise ValueError(
                    "api_evidence_weight with a proxy of another tokenizer is not supported; use a proxy of the "
                    "student's tokenizer, or estimator.posterior.api_evidence_weight=0"
                )
            return self._estimate_mapped(proxy, corpus, prior, out, provenance, mapped, write)

        def rows_for(logits: torch.Tensor, seqs: list[int], generator: torch.Generator) -> SparseRows:
            prior_rows = SparseRows.concat([prior.rows(i) for i in seqs])
            if len(prior_rows.ids) != logits.shape[0]:
                raise RuntimeError(
                    f"prior has {len(prior_rows.ids)} rows for sequences {seqs}, proxy {logits.shape[0]}"
                )
            probs = torch.softmax(logits.float() / self.proxy_sampling_temperature, dim=-1)
            evidence = None
            if self.api_evidence_weight:
                rows = SparseRows.concat([api_evidence.rows(i) for i in seqs])
                present = torch.from_numpy(np.concatenate([api_evidence.evidence(i) for i in seqs]))
                evidence = (rows, present)
            return self.posterior_rows(prior_rows, probs.cpu(), generator, evidence)

        return estimate_by_shard(
            proxy,
            corpus,
            pad_id,
            out,
            provenance,
            self.shard_size,
            self.batch_size,
            self.seed,
            f"posterior R={self.sampling_rounds}",
            rows_for,
            self.packing,
            self.pack_length,
            write=write,
        )

    def mapped_posterior_rows(
        self,
        prior: SparseRows,
        proxy_probs: torch.Tensor,
        index: torch.Tensor,
        token_map: torch.Tensor,
        vocab: int,
        generator: torch.Generator,
    ) -> SparseRows:
        """Posterior rows (one per prior row) from a foreign proxy's distributions.

        ``index`` (N,) names the ``proxy_probs`` row aligned with each prior row (-1: none, the prior is
        kept). The update rule's counts over the proxy's vocabulary are moved to the student token that
        begins each drawn token's string (``token_map``, -1: dropped) and combined with the prior.
        """
        dense_prior = prior.to_dense(vocab).to(proxy_probs.device)
        aligned = index >= 0
        counts = self.update.counts(proxy_probs[index[aligned]], self.sampling_rounds, generator)
        keep = token_map >= 0
        mapped = torch.zeros((len(counts), vocab), dtype=counts.dtype, device=counts.device)
        mapped.index_add_(1, token_map[keep], counts[:, keep])
        posterior = dense_prior.clone()
        posterior[aligned] = self.update.from_counts(dense_prior[aligned], mapped)
        return SparseRows.from_dense(posterior, self.top_k, id_dtype_for(vocab))

    def _estimate_mapped(
        self,
        proxy: nn.Module,
        corpus: TokenizedCorpus,
        prior: SoftLabelStore,
        out: str,
        provenance: dict,
        mapped: MappedProxy,
        write: StoreWrite | None = None,
    ) -> SoftLabelStore:
        view, vocab = mapped.view, int(mapped.vocab_size)
        s_offsets = corpus.target_offsets()
        table = torch.as_tensor(mapped.token_map, dtype=torch.long)

        def rows_for(logits: torch.Tensor, seqs: list[int], generator: torch.Generator) -> SparseRows:
            prior_rows = SparseRows.concat([prior.rows(i) for i in seqs])
            at, rows = view.aligned_rows(s_offsets, seqs)
            if rows != logits.shape[0]:
                raise RuntimeError(f"proxy rows {logits.shape[0]} != {rows} for sequences {seqs}")
            probs = torch.softmax(logits.float() / self.proxy_sampling_temperature, dim=-1).cpu()
            index_t = torch.from_numpy(at)
            return self.mapped_posterior_rows(prior_rows, probs, index_t, table, vocab, generator)

        return estimate_by_shard(
            proxy,
            corpus,
            0,
            out,
            provenance,
            self.shard_size,
            self.batch_size,
            self.seed,
            f"posterior R={self.sampling_rounds} (mapped proxy)",
            rows_for,
            self.packing,
            self.pack_length,
            model_corpus=view.corpus,
            write=write,
        )
