"""Collator for contrastive training: groups of 1 positive + n hard negatives per query, tokenised and padded.

Output (contract 5): `{"query": model inputs, "passage": model inputs, "positive_index" (Q,), "passage_keys" (P,),
"query_positive_keys" (Q, K)}`. Passages are laid out query by query: `[q0 positive, q0 negatives..., q1 positive, ...]`,
so `positive_index[i] = i * (1 + n_hard_negatives)`. `passage_keys` are KB row positions (int64) and
`query_positive_keys` every positive row of each query (padded with -1): the loss never counts a passage as a negative
for a query that has it among its positives (a passage shared by two queries, or drawn as another query's negative).

Sampling is reproducible and resumable: the positive and the negatives of a query depend only on
`(seed, epoch, query id)`, not on the batch composition or on how many batches were drawn before (Tevatron samples
from `hash(seed + epoch)`, DPR shuffles per epoch). A query with fewer hard negatives than asked gets random KB
passages (not among its positives) from the same generator.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from .data import FEATURE_FILE_SUFFIXES, PreparedData


logger = logging.get_logger(__name__)


def stable_hash(value: Any) -> int:
    """A 63-bit hash of `str(value)`, the same in every process and run (unlike Python's salted `hash`)."""
    return int.from_bytes(hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest(), "little") >> 1


def _load_feature_file(path: str) -> dict[str, np.ndarray | None]:
    if path.endswith(".npy"):
        return {"visual_feats": np.load(path, allow_pickle=False), "visual_pos": None}
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as archive:
            return {"visual_feats": archive["visual_feats"], "visual_pos": archive.get("visual_pos")}
    from safetensors.numpy import load_file

    arrays = load_file(path)
    return {"visual_feats": arrays["visual_feats"], "visual_pos": arrays.get("visual_pos")}


def resolve_visual(
    value: Any, feature_store: Mapping[str, Any] | None = None, image_root: str | None = None
) -> tuple[str, Any] | None:
    """
    One query's / passage's image reference -> `("features", {"visual_feats": (V, C), "visual_pos": (V, 4) | None})`,
    `("image", PIL.Image)`, or None. Image files are opened here (lazily, at collate time) with
    `vl_joint_encoder.images.load_image`, whose errors name the file.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if feature_store is not None and value in feature_store:
            entry = feature_store[value]
            source = f"feature-store key {value!r}"
            if isinstance(entry, Mapping):
                feats, pos = np.asarray(entry["visual_feats"]), entry.get("visual_pos")
                return "features", {"visual_feats": feats, "visual_pos": pos, "source": source}
            return "features", {"visual_feats": np.asarray(entry), "visual_pos": None, "source": source}
        path = os.path.join(image_root, value) if image_root and not os.path.isabs(value) else value
        if path.lower().endswith(FEATURE_FILE_SUFFIXES):
            if not os.path.exists(path):
                raise ValueError(f"visual feature file {path!r} does not exist (check image_root / the feature store)")
            return "features", {**_load_feature_file(path), "source": f"feature file {path!r}"}
        from .images import load_image

        if not os.path.exists(path):
            hint = "" if feature_store is None else " and is not a key of the feature store"
            raise ValueError(f"image {path!r} does not exist{hint}: check image_root ({image_root!r}) or the data")
        return "image", load_image(path)
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):  # a datasets.Image(decode=False) cell
        if value.get("bytes") is None and value.get("path") is None:
            return None
        from .images import load_image

        source = value["bytes"] if value.get("bytes") is not None else value["path"]
        if isinstance(source, str) and image_root and not os.path.isabs(source):
            source = os.path.join(image_root, source)
        return "image", load_image(source)
    if isinstance(value, Mapping) and "visual_feats" in value:
        return "features", {"visual_feats": np.asarray(value["visual_feats"]), "visual_pos": value.get("visual_pos")}
    if isinstance(value, (list, np.ndarray, torch.Tensor)):
        array = np.asarray(value, dtype=np.float32)
        if array.ndim != 2:
            raise ValueError(f"inline visual features must be (visual_tokens, feat_dim), got shape {array.shape}")
        return "features", {"visual_feats": array, "visual_pos": None}
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None and isinstance(value, Image.Image):
        return "image", value
    raise ValueError(f"cannot read an image reference of type {type(value).__name__}: {value!r:.80}")


def pad_visual_features(items: Sequence[dict | None], feat_dim: int | None = None) -> dict[str, torch.Tensor]:
    """
    Pad per-example features (V_i, C) to (B, max V, C); rows without an image get a zero visual mask. Every item
    gets the checks of `JointEncoderProcessor`'s precomputed-feature path: finite values, `visual_pos` normalised
    (x1, y1, x2, y2) boxes (`normalize_boxes`: small overshoots clamped, larger ones refused), one box per token. The
    output equals the processor's (`image_order_ids` / `object_order_ids` omitted: the model's defaults, zeros and
    0..V-1, are the processor's values for one image per row).
    """
    from .processing_joint_encoder import normalize_boxes

    present = [item for item in items if item is not None]
    channels = feat_dim or present[0]["visual_feats"].shape[-1]
    length = max(item["visual_feats"].shape[0] for item in present)
    batch = len(items)
    feats = torch.zeros(batch, length, channels)  # (B, V, C)
    pos = torch.zeros(batch, length, 4)  # (B, V, 4)
    mask = torch.zeros(batch, length, dtype=torch.long)  # (B, V)
    for i, item in enumerate(items):
        if item is None:
            continue
        where = item.get("source") or f"visual features of row {i}"
        values = np.asarray(item["visual_feats"], dtype=np.float32)
        if values.ndim != 2 or values.shape[1] != channels:
            raise ValueError(
                f"{where}: visual features of shape {tuple(values.shape)} in a batch of feat_dim {channels}: every "
                f"feature must be (visual_tokens, {channels}); extract features with the model's backbone"
            )
        if not np.isfinite(values).all():
            raise ValueError(
                f"{where} holds {int((~np.isfinite(values)).sum())} NaN/infinite values: the feature file is corrupt "
                f"or was written from a diverged extractor; re-extract it"
            )
        n = values.shape[0]
        feats[i, :n] = torch.as_tensor(values)
        if item.get("visual_pos") is not None:
            boxes = normalize_boxes(np.asarray(item["visual_pos"], dtype=np.float32), None, where=f"{where}: visual_pos")
            if boxes.shape[0] != n:
                raise ValueError(f"{where} has {n} visual tokens but {boxes.shape[0]} boxes in visual_pos")
            pos[i, :n] = torch.as_tensor(boxes)
        mask[i, :n] = 1
    return {"visual_feats": feats, "visual_pos": pos, "visual_attention_mask": mask}


class JointEncoderInputBuilder:
    """
    Texts + image references (`resolve_visual`) -> model inputs for one side (queries or passages): THE batch code of
    training (`ContrastiveCollator`), KB encoding (`encode.embed_batches`), search and `RetrievalEvaluator`. Uses a
    `JointEncoderProcessor` for PIL images / image files when given one (the model then needs a vision tower), the
    tokenizer alone for text, and pads precomputed features (feature-store keys, feature files, inline arrays) with
    `pad_visual_features`. `feat_dim` defaults to the processor's.
    """

    def __init__(
        self,
        processing_class: Any,
        max_length: int,
        feature_store: Mapping[str, Any] | None = None,
        image_root: str | None = None,
        feat_dim: int | None = None,
        use_images: bool = True,
    ):
        self.processing_class = processing_class
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.max_length = max_length
        self.feature_store = feature_store
        self.image_root = image_root
        self.feat_dim = feat_dim if feat_dim is not None else getattr(processing_class, "feat_dim", None)
        self.use_images = use_images

    def __call__(self, texts: Sequence[str], images: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
        texts = list(texts)
        resolved = [None] * len(texts)
        if self.use_images and images is not None:
            resolved = [resolve_visual(value, self.feature_store, self.image_root) for value in images]
        kinds = {item[0] for item in resolved if item is not None}
        if len(kinds) > 1:
            raise ValueError("a batch mixes image files and precomputed features: use one kind for all queries/passages")
        if kinds == {"image"}:
            if self.processing_class is self.tokenizer:
                raise ValueError(
                    "images were given as files/PIL but only a plain tokenizer, no JointEncoderProcessor: pass the "
                    "processor (processing_class / --processor; the model needs a vision tower), or give precomputed "
                    "features (a feature store)"
                )
            pil = [item[1] if item is not None else None for item in resolved]
            return dict(
                self.processing_class(
                    text=texts, images=pil, return_tensors="pt", padding=True, truncation=True,
                    max_length=self.max_length,
                )
            )
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if kinds == {"features"}:
            inputs.update(pad_visual_features([item[1] if item is not None else None for item in resolved], self.feat_dim))
        return inputs


class ContrastiveCollator:
    """
    Builds training batches from `PreparedData.queries` rows (see the module docstring for the output).

    Args:
        data: the validated queries + KB (`prepare_training_data`).
        processing_class: the model's tokenizer, or a `JointEncoderProcessor`.
        n_hard_negatives: hard negatives per query (0: in-batch negatives only).
        query_max_length / passage_max_length: truncation lengths in tokens.
        seed: sampling seed; `epoch` is set by the trainer at each epoch start.
        feature_store: precomputed visual features by key (`data.load_feature_store`).
        image_root: folder that relative image paths are relative to.
        use_query_images / use_passage_images: False makes a text-only model (ablation).
    """

    def __init__(
        self,
        data: PreparedData,
        processing_class: Any,
        n_hard_negatives: int = 1,
        query_max_length: int = 64,
        passage_max_length: int = 256,
        seed: int = 42,
        feature_store: Mapping[str, Any] | None = None,
        image_root: str | None = None,
        feat_dim: int | None = None,
        use_query_images: bool = True,
        use_passage_images: bool = True,
    ):
        if n_hard_negatives < 0:
            raise ValueError(f"n_hard_negatives must be >= 0, got {n_hard_negatives}")
        if n_hard_negatives + 1 > len(data.kb):
            raise ValueError(f"n_hard_negatives={n_hard_negatives} needs a KB of more than {n_hard_negatives} passages")
        self.data = data
        self.n_hard_negatives = n_hard_negatives
        self.seed = seed
        self.epoch = 0
        self.query_inputs = JointEncoderInputBuilder(
            processing_class, query_max_length, feature_store, image_root, feat_dim, use_query_images
        )
        self.passage_inputs = JointEncoderInputBuilder(
            processing_class, passage_max_length, feature_store, image_root, feat_dim, use_passage_images
        )

    def sample_group(self, query_id: str, positive_rows: Sequence[int], negative_rows: Sequence[int]) -> list[int]:
        """[positive, negatives...] KB rows for one query, a function of (seed, epoch, query id) only."""
        rng = np.random.default_rng([self.seed, self.epoch, stable_hash(query_id)])
        positives = list(positive_rows)
        positive = int(positives[rng.integers(len(positives))])
        excluded = set(map(int, positives))
        candidates = [int(r) for r in negative_rows if int(r) not in excluded]
        n = self.n_hard_negatives
        if len(candidates) >= n:
            chosen = [candidates[i] for i in rng.choice(len(candidates), size=n, replace=False)] if n else []
        else:
            chosen = [candidates[i] for i in rng.permutation(len(candidates))]
            kb_size = len(self.data.kb)
            taken = excluded | set(chosen)
            if kb_size - len(taken) < n - len(chosen):
                raise ValueError(
                    f"query {query_id!r}: the KB has too few passages outside its positives for {n} negatives"
                )
            while len(chosen) < n:  # random KB passages: the fallback when hard negatives run out
                row = int(rng.integers(kb_size))
                if row not in taken:
                    chosen.append(row)
                    taken.add(row)
        return [positive] + chosen

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        groups = [self.sample_group(f["query_id"], f["positive_rows"], f["negative_rows"]) for f in features]
        rows = [row for group in groups for row in group]
        texts, images = self.data.passages(rows)
        query = self.query_inputs([f["question"] for f in features], [f.get("image") for f in features])
        passage = self.passage_inputs(texts, images)
        group_size = 1 + self.n_hard_negatives
        max_positives = max(len(f["positive_rows"]) for f in features)
        query_positive_keys = torch.full((len(features), max_positives), -1, dtype=torch.long)  # (Q, K)
        for i, f in enumerate(features):
            query_positive_keys[i, : len(f["positive_rows"])] = torch.as_tensor(list(f["positive_rows"]), dtype=torch.long)
        return {
            "query": query,
            "passage": passage,
            "positive_index": torch.arange(len(features), dtype=torch.long) * group_size,  # (Q,)
            "passage_keys": torch.as_tensor(rows, dtype=torch.long),  # (P,)
            "query_positive_keys": query_positive_keys,
        }


__all__ = ["ContrastiveCollator", "JointEncoderInputBuilder", "resolve_visual", "pad_visual_features", "stable_hash"]
