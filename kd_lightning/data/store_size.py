"""How many bytes a soft-label store takes, before it is built (``kdl plan``, the disk-full message)."""

from __future__ import annotations

from kd_lightning.data.soft_labels import id_dtype_for
from kd_lightning.data.store_format import StoreFormat

NPY_HEADER_BYTES = 128
"""Header of a version-1 ``.npy`` file with a short dtype/shape description."""
META_BYTES = 1024
"""A store's ``meta.json`` (provenance), about a kilobyte."""


def store_bytes(
    rows: int,
    sequences: int,
    top_k: int,
    vocab_size: int,
    fmt: StoreFormat | None = None,
    counts: bool = False,
    channels: int = 0,
) -> float:
    """Bytes of a store of ``rows`` target positions over ``sequences`` at ``top_k`` (the plan's formula).

    Exact for fixed rows (every format). Ragged rows keep as many entries as each row turns out to need,
    which only the build knows: the figure is then the most they can take (every row with K entries).
    ``counts``: the store's rows are draws that ``store_format.probabilities=counts`` keeps as counts (no
    tail array). ``channels``: float32 numbers per row beside it (the prior's context counts and orders)."""
    fmt = fmt or StoreFormat()
    extra = channels * (rows * 4 + NPY_HEADER_BYTES)
    id_bytes = id_dtype_for(vocab_size).itemsize
    value_bytes = 2 if fmt.probabilities == "fp16" else 1
    offsets = (sequences + 1) * 8
    tail = 0 if counts and fmt.probabilities == "counts" else rows * 4
    if fmt.is_legacy:
        return float(
            rows * top_k * (id_bytes + 2) + rows * 4 + offsets + 4 * NPY_HEADER_BYTES + META_BYTES + extra
        )
    if fmt.ragged:  # entries per row, entry offsets per sequence
        arrays = rows * top_k * (id_bytes + value_bytes) + rows + 2 * offsets
        files = 6
    else:
        arrays = rows * top_k * (id_bytes + value_bytes) + offsets
        files = 4
    return float(arrays + tail + (files - (tail == 0)) * NPY_HEADER_BYTES + META_BYTES + extra)
