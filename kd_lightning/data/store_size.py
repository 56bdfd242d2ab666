"""How many bytes a soft-label store takes, before it is built (``kdl plan``, the disk-full message)."""

from __future__ import annotations

from kd_lightning.data.soft_labels import id_dtype_for

NPY_HEADER_BYTES = 128
"""Header of a version-1 ``.npy`` file with a short dtype/shape description."""
META_BYTES = 1024
"""A store's ``meta.json`` (provenance), about a kilobyte."""


def store_bytes(rows: int, sequences: int, top_k: int, vocab_size: int) -> float:
    """Bytes of a store of ``rows`` target positions over ``sequences`` at ``top_k`` (the plan's formula)."""
    id_bytes = id_dtype_for(vocab_size).itemsize
    arrays = rows * top_k * (id_bytes + 2) + rows * 4 + (sequences + 1) * 8
    return float(arrays + 4 * NPY_HEADER_BYTES + META_BYTES)
