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
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from ..data.feature_stores import open_feature_store
from ..data.inputs import JointEncoderInputBuilder
from ..data.tables import PreparedData


logger = logging.get_logger(__name__)


def stable_hash(value: Any) -> int:
    """A 63-bit hash of `str(value)`, the same in every process and run (unlike Python's salted `hash`)."""
    return int.from_bytes(hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest(), "little") >> 1


class ContrastiveCollator:
    """
    Builds training batches from `PreparedData.queries` rows (see the module docstring for the output).

    Args:
        data: the validated queries + KB (`prepare_training_data`).
        processing_class: the model's tokenizer, or a `JointEncoderProcessor`.
        n_hard_negatives: hard negatives per query (0: in-batch negatives only).
        query_max_length / passage_max_length: truncation lengths in tokens.
        seed: sampling seed; `epoch` is set by the trainer at each epoch start.
        feature_store: precomputed visual features by key (anything `data.feature_stores.open_feature_store` takes).
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
        feature_store: Any = None,
        image_root: str | None = None,
        feat_dim: int | None = None,
        use_query_images: bool = True,
        use_passage_images: bool = True,
        expected_features: Any = None,
    ):
        if n_hard_negatives < 0:
            raise ValueError(f"n_hard_negatives must be >= 0, got {n_hard_negatives}")
        if n_hard_negatives + 1 > len(data.kb):
            raise ValueError(f"n_hard_negatives={n_hard_negatives} needs a KB of more than {n_hard_negatives} passages")
        self.data = data
        self.n_hard_negatives = n_hard_negatives
        self.seed = seed
        self.epoch = 0
        feature_store = open_feature_store(feature_store)  # opened once, shared by both sides
        # expected_features: the model's config.visual_features (what a converted checkpoint was trained on)
        self.query_inputs = JointEncoderInputBuilder(
            processing_class, query_max_length, feature_store, image_root, feat_dim, use_query_images,
            expected_features=expected_features,
        )  # fmt: skip
        self.passage_inputs = JointEncoderInputBuilder(
            processing_class, passage_max_length, feature_store, image_root, feat_dim, use_passage_images,
            expected_features=expected_features,
        )  # fmt: skip

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


__all__ = ["ContrastiveCollator", "stable_hash"]
