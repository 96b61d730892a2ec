"""The package's training data (queries + KB, the generic format of `data.tables`) as a sentence-transformers dataset.

`SentenceTransformerTrainer` with `(Cached)MultipleNegativesRankingLoss` reads a `datasets.Dataset` whose columns are,
in order, the anchor, the positive and optional negatives (sentence-transformers' "(anchor, positive, negative_1,
..., negative_n)" format). Each cell here is one input of the joint encoder's sentence-transformers module
(`sentence_transformers_joint_encoder.JointEncoderModule`): `{"text": ..., "image": ...}`, the image being an image
file path (models with a vision tower) or precomputed features `(visual tokens, feat_dim)` (models without), or None.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data.references import (
    IMAGE_BYTES,
    IMAGE_FILE,
    NONE,
    PIL_IMAGE,
    classify,
    resolve_visual,
    resolved_path,
    shown,
)
from ..data.tables import ColumnMapping, PreparedData, prepare_training_data


def _cell(text: str, reference: Any, feature_store: Any, image_root: str | None, where: str) -> dict:
    kind = classify(reference, feature_store, image_root)
    if kind == NONE:
        return {"text": text, "image": None}
    if kind == IMAGE_FILE:  # the path only: the module opens it at batch time, as the package's batches do
        return {"text": text, "image": resolved_path(shown(reference), image_root)}
    if kind in (PIL_IMAGE, IMAGE_BYTES):
        raise ValueError(
            f"{where}: an in-memory image ({type(reference).__name__}); this dataset holds image file paths (relative "
            f"to image_root) or precomputed features: save the images as files"
        )
    _, value = resolve_visual(reference, feature_store, image_root)  # features (or a clear error for a missing file)
    if value.get("visual_pos") is not None and np.any(np.asarray(value["visual_pos"])):
        raise ValueError(
            f"{where}: {value['source']} has boxes (visual_pos), which sentence-transformers inputs cannot carry; "
            f"train with vl-joint-encoder train (JointEncoderTrainer) for region features with boxes"
        )
    return {"text": text, "image": np.asarray(value["visual_feats"], dtype=np.float32).tolist()}


def sentence_transformers_dataset(
    queries: Any,
    kb: Any = None,
    mapping: ColumnMapping | None = None,
    feature_store: Any = None,
    image_root: str | None = None,
    n_negatives: int = 0,
    on_missing_positive: str = "skip",
):
    """
    `datasets.Dataset` with columns `anchor` (question + image), `positive` (the first positive passage + its image)
    and `negative_1..n` (the first `n_negatives` hard negatives of each query; queries with fewer are dropped, as a
    fixed number of columns needs). `queries` / `kb` are what `prepare_training_data` accepts, or a `PreparedData`.
    """
    from datasets import Dataset

    from ..data.feature_stores import open_feature_store

    prepared = (
        queries
        if isinstance(queries, PreparedData)
        else prepare_training_data(queries, kb, mapping, on_missing_positive)
    )
    store = open_feature_store(feature_store)
    rows: dict[str, list] = {"anchor": [], "positive": [], **{f"negative_{k + 1}": [] for k in range(n_negatives)}}
    dropped = 0
    for query in prepared.queries:
        negatives = list(query["negative_rows"])[:n_negatives]
        if len(negatives) < n_negatives:
            dropped += 1
            continue
        where = f"query {query['query_id']!r}"
        rows["anchor"].append(_cell(query["question"], query["image"], store, image_root, where))
        texts, images = prepared.passages([int(query["positive_rows"][0]), *map(int, negatives)])
        for k, (text, image) in enumerate(zip(texts, images)):
            column = "positive" if k == 0 else f"negative_{k}"
            rows[column].append(_cell(text, image, store, image_root, f"{where}, {column}"))
    if not rows["anchor"]:
        raise ValueError(
            f"no query has {n_negatives} hard negatives ({dropped} dropped): lower n_negatives or mine negatives"
        )
    return Dataset.from_dict(rows)


__all__ = ["sentence_transformers_dataset"]
