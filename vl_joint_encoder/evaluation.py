"""`RetrievalEvaluator`: encode a dev KB, search it, score the run; what the Trainer calls at each evaluation step.

It runs exactly the code of the CLIs: `encode.encode_knowledge_base` (into a temporary directory), the exact search of
`search.search_store`, and `ir_metrics.evaluate` (values equal ranx's).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers.utils import logging

from . import ir_metrics
from .embedding_store import EmbeddingStore
from .encode import encode_knowledge_base, read_knowledge_base
from .search import encode_queries, read_queries, search_store, to_run
from .visual_references import check_image_references, open_feature_store


logger = logging.get_logger(__name__)


class RetrievalEvaluator:
    """
    Retrieval metrics of a model on held-out queries over a (dev) knowledge base.

    Args:
        queries: rows `id`, `question`, optional `image` (datasets.Dataset, file path, list of dicts).
        kb: rows `id`, `text`, optional `image`.
        processor: tokenizer or `JointEncoderProcessor` (both sides).
        qrels: `{query_id: {passage_id: relevance}}`; default: built from the queries' `positive_ids` column.
        metrics: ranx-style names, default `("mrr@10", "mrr@100", "precision@1", "precision@20", "hit_rate@20")`.
        k: depth of the search (at least the largest cutoff).
        batch_size, max_length, shard_size: encoding parameters (as in `vl-joint-encoder encode`).
        feature_store: precomputed visual features (`.npz` / `.safetensors` path, read once here, or a mapping from
            `data.load_feature_store`); query / KB `image` cells that are its keys use them, on both sides.
        image_root: folder that relative image paths (queries and KB) are relative to.

    Call `evaluator(model)` (one shared tower) or `evaluator(query_model, passage_model)` (separate towers) ->
    `{"mrr@10": ..., ...}`. In a multi-process run every rank computes the same numbers (no collective calls).

    Example:

    ```python
    >>> evaluator = RetrievalEvaluator(dev_queries, dev_kb, processor, metrics=["mrr@10"])
    >>> trainer = JointEncoderTrainer(..., evaluator=evaluator)  # args.eval_strategy="steps"
    ```
    """

    def __init__(
        self,
        queries: Any,
        kb: Any,
        processor: Any,
        qrels: Mapping[str, Mapping[str, int]] | None = None,
        metrics: Sequence[str] = ("mrr@10", "mrr@100", "precision@1", "precision@20", "hit_rate@20"),
        k: int | None = None,
        batch_size: int = 64,
        max_length: int = 256,
        shard_size: int = 50_000,
        autocast_dtype: str = "float32",
        query_columns: Mapping[str, str | None] | None = None,
        kb_columns: Mapping[str, str | None] | None = None,
        feature_store: Any = None,
        image_root: str | None = None,
    ):
        for name in metrics:
            ir_metrics.parse_metric(name)  # fail now, not at the first evaluation step
        self.metrics = list(metrics)
        cutoffs = [ir_metrics.parse_metric(name)[1] for name in self.metrics]
        self.k = k or max(100, *cutoffs)
        self.processor = processor
        self.kb = kb
        self.kb_columns = dict(kb_columns or {})
        self.feature_store, self.feature_store_path = open_feature_store(feature_store)
        self.image_root = image_root
        self.query_ids, self.query_texts, self.query_images = read_queries(
            queries, **dict(query_columns or {}), feature_store=self.feature_store, image_root=image_root
        )
        kb_ids, _, kb_images = read_knowledge_base(kb, **self.kb_columns)  # fail now on a bad KB, not at step N
        check_image_references(kb_ids, kb_images, self.feature_store, self.feature_store_path, image_root, "KB passages")
        self.qrels = dict(qrels) if qrels is not None else self._qrels_from_positives(queries)
        missing = [q for q in self.query_ids if q not in self.qrels]
        if missing:
            logger.warning(f"{len(missing)} evaluation queries have no qrels and are not scored, e.g. {missing[:3]}")
        self.encode_kwargs = dict(
            batch_size=batch_size,
            max_length=max_length,
            autocast_dtype=autocast_dtype,
            feature_store=self.feature_store,
            image_root=image_root,
        )
        self.shard_size = shard_size

    @staticmethod
    def _qrels_from_positives(queries: Any) -> dict[str, dict[str, int]]:
        from .data import load_table

        table = load_table(queries, name="the queries")
        if "positive_ids" not in table.column_names:
            raise ValueError("give qrels, or queries with a `positive_ids` column (list of relevant KB ids)")
        return {
            str(q): {str(p): 1 for p in (positives or [])} for q, positives in zip(table["id"], table["positive_ids"])
        }

    @torch.no_grad()
    def run(self, query_model: torch.nn.Module, passage_model: torch.nn.Module | None = None) -> dict:
        """The search run `{query_id: {passage_id: score}}` of the model(s) over the KB."""
        passage_model = passage_model if passage_model is not None else query_model
        if passage_model.config.similarity != query_model.config.similarity:
            raise ValueError("query and passage models must share one similarity")
        with tempfile.TemporaryDirectory(prefix="vl-joint-encoder-eval-") as directory:
            encode_knowledge_base(
                passage_model,
                self.processor,
                self.kb,
                directory,
                shard_size=self.shard_size,
                progress=False,
                **self.encode_kwargs,
                **self.kb_columns,
            )
            store = EmbeddingStore(directory)
            embeddings = encode_queries(
                query_model, self.processor, self.query_texts, self.query_images, **self.encode_kwargs
            )  # (Q, D)
            device = next(query_model.parameters()).device
            scores, positions = search_store(embeddings, store, min(self.k, store.count), device=str(device))
            return to_run(self.query_ids, scores, positions, store.ids)

    def __call__(self, query_model: torch.nn.Module, passage_model: torch.nn.Module | None = None) -> dict[str, float]:
        run = self.run(query_model, passage_model)
        qrels = {q: self.qrels[q] for q in self.query_ids if q in self.qrels}
        return ir_metrics.evaluate(qrels, run, self.metrics)


__all__ = ["RetrievalEvaluator"]
