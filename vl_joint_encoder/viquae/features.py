"""Global image vectors (ViQuAE's ``clip-RN50`` 1024-d, ``imagenet-RN50`` 2048-d, ...) as ONE visual token.

The authors store one vector per image in a column of the question and article datasets (``meerqat/image/
embedding.py``; the KB's reach passages through ``index``). `GlobalVectorStore` is a feature store
(`data.feature_stores.FeatureStore`) that gives each image file name its vector as ``visual_feats`` (1, C) with
the whole-image box ``visual_pos`` (1, 4) = (0, 0, 1, 1), so the joint encoder reads it like any precomputed
feature; the model's visual embedding (``Linear(feat_dim, d_model)``) is the learned projection, so the model's
``feat_dim`` must be the vectors' size (starting from a checkpoint of another ``feat_dim``, load it with
``feat_dim=C, ignore_mismatched_sizes=True``: the projection starts anew).

Sources: a column of vectors in a table (keys from its image column; a row without a vector has no key), or the
``pooled`` array of a ``vl-joint-encoder extract-features`` folder (for new images; the pooled output of a CLIP ViT
tower is its post-layernorm CLS token, before CLIP's projection).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
from transformers.utils import logging

from ..data.tables import arrow_column, column_values


logger = logging.get_logger(__name__)

WHOLE_IMAGE = np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32)


class GlobalVectorStore:
    """`store[image name] -> {"visual_feats": (1, C), "visual_pos": (1, 4)}` over a (N, C) matrix of vectors."""

    def __init__(self, keys: Sequence[str], vectors: np.ndarray, path: str | None = None):
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(keys):
            raise ValueError(f"vectors must be (len(keys), dim), got {vectors.shape} for {len(keys)} keys")
        bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        if len(bad):
            raise ValueError(f"{len(bad)} image vectors hold NaN/inf (e.g. {keys[int(bad[0])]!r}): re-extract them")
        self.index = {key: row for row, key in enumerate(keys)}
        self.vectors = vectors
        self.path = path

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __contains__(self, key: object) -> bool:
        return key in self.index

    def __getitem__(self, key: str) -> dict[str, np.ndarray]:
        return {"visual_feats": self.vectors[self.index[key]][None, :], "visual_pos": WHOLE_IMAGE}

    def __len__(self) -> int:
        return len(self.index)

    def keys(self) -> list[str]:
        return list(self.index)

    def reference(self, key: str | None) -> str | None:
        """`key` if the store has its vector, else None (that image is used as no image)."""
        return key if key is not None and key in self.index else None

    @classmethod
    def from_tables(cls, tables: Iterable[tuple[object, str, str]], path: str | None = None) -> GlobalVectorStore:
        """From `(dataset, key column, vector column)` triples (e.g. questions and articles, both keyed by image
        file name); rows whose vector is null are left out. A key given twice must carry the same vector."""
        keys, blocks, seen = [], [], {}
        for table, key_column, vector_column in tables:
            for column in (key_column, vector_column):
                if column not in table.column_names:
                    raise ValueError(f"the table has no column {column!r} (it has {table.column_names})")
            names, matrix = column_values(table, key_column), _matrix(table, vector_column)
            for row, name in enumerate(names):
                if name is None or matrix[row] is None or len(matrix[row]) == 0:
                    continue  # meerqat stores None for an image it could not read (or a face-masked one)
                if blocks and len(matrix[row]) != len(blocks[0]):
                    raise ValueError(
                        f"image {name!r} has a {len(matrix[row])}-d vector in {vector_column!r}, others "
                        f"{len(blocks[0])}-d: one column of one extractor per store"
                    )
                if name in seen:
                    if not np.allclose(blocks[seen[name]], matrix[row], atol=1e-6):
                        raise ValueError(f"image {name!r} has two different vectors in column {vector_column!r}")
                    continue
                seen[name] = len(keys)
                keys.append(name)
                blocks.append(matrix[row])
        if not keys:
            raise ValueError("no image vector found in the given columns")
        return cls(keys, np.stack(blocks), path)

    @classmethod
    def from_extracted(cls, folder: str | os.PathLike) -> GlobalVectorStore:
        """The ``pooled`` vectors of an extract-features output folder, keyed by its image ids."""
        from ..data.feature_stores import ExtractedFeatureStore

        store = ExtractedFeatureStore(folder)
        keys = store.keys()
        return cls(keys, np.stack([np.asarray(store[key]["pooled"], dtype=np.float32) for key in keys]), store.path)


def _matrix(table, column: str) -> list:
    """A list with one (C,) float32 array (or None) per row of a list-of-floats column, read through Arrow."""
    import pyarrow as pa

    values = arrow_column(table, column).combine_chunks()
    if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)
            or pa.types.is_fixed_size_list(values.type)):  # fmt: skip
        raise ValueError(f"column {column!r} holds {values.type}, not vectors (lists of floats)")
    nulls = values.is_null().to_numpy(zero_copy_only=False)
    flat = values.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if pa.types.is_fixed_size_list(values.type):
        size = values.type.list_size
        offsets = np.arange(len(values) + 1) * size + values.offset * size
    else:
        offsets = values.offsets.to_numpy()
    out = [None if nulls[row] else flat[offsets[row] : offsets[row + 1]] for row in range(len(values))]
    return out


__all__ = ["WHOLE_IMAGE", "GlobalVectorStore"]
