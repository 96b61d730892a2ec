"""`RetrievalEvaluator`: encode a dev KB, search it, score the run with ranx; what the Trainer runs at evaluation.

It runs exactly the code of the commands: `encode.encode_knowledge_base` (into a temporary folder, the shards split
across processes when several run), the exact search of `search.search_store`, and `metrics.evaluate` (ranx).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers.utils import logging

from ..data.feature_stores import open_feature_store
from ..data.references import check_image_references
from ..data.tables import ColumnMapping, qrels_from_queries, read_knowledge_base, read_queries
from .embed import embed_batches
from .encode import check_kb_images, encode_knowledge_base
from .kb_reader import KBReader
from .metrics import check_metrics, evaluate, metric_cutoff
from .runs import to_run
from .search import search_store
from .store import EmbeddingStore


logger = logging.get_logger(__name__)


class RetrievalEvaluator:
    """
    Retrieval metrics of a model on held-out queries over a (dev) knowledge base.

    Args:
        queries: rows `id`, `question`, optional `image` (anything `data.tables.read_queries` accepts).
        kb: rows `id`, `text`, optional `image` (anything `data.tables.read_knowledge_base` accepts).
        processor: tokenizer or `JointEncoderProcessor` (both sides).
        qrels: `{query_id: {passage_id: relevance}}`; default: the queries' positives.
        metrics: ranx names, default `("mrr@10", "mrr@100", "precision@1", "precision@20", "hit_rate@20")`.
        k: depth of the search (default: at least 100 and the largest cutoff).
        batch_size, max_length, shard_size, autocast_dtype: encoding parameters (as in `vl-joint-encoder encode`).
        columns: the `ColumnMapping` of queries and KB (default: the generic format).
        feature_store: precomputed visual features (anything `open_feature_store` accepts), opened once here; query
            / KB `image` cells that are its keys use them, on both sides.
        image_root: folder that relative image paths (queries and KB) are relative to.
        primary_metric: the metric that selects the best checkpoint (default: the first of `metrics`);
            `greater_is_better` says its direction (True for every ranx metric).

    Call `evaluator(model)` (one shared tower) or `evaluator(query_model, passage_model)` (separate towers) ->
    `{"mrr@10": ..., ...}`. With several processes (`state`, an accelerate `PartialState`), each encodes its share of
    the KB shards once, the main process searches and scores, and every process returns the same numbers.

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
        columns: ColumnMapping | None = None,
        feature_store: Any = None,
        image_root: str | None = None,
        primary_metric: str | None = None,
        greater_is_better: bool = True,
    ):
        self.metrics = check_metrics(metrics)  # fail now, not at the first evaluation step
        self.primary_metric = primary_metric or self.metrics[0]
        if self.primary_metric not in self.metrics:
            raise ValueError(f"primary_metric {self.primary_metric!r} is not among the metrics {self.metrics}")
        self.greater_is_better = greater_is_better
        self.k = k or max(100, *(metric_cutoff(name) for name in self.metrics))
        self.processor = processor
        self.columns = columns or ColumnMapping()
        self.feature_store = open_feature_store(feature_store)
        self.image_root = image_root
        # read and check everything now: a bad reference fails before training, not at step N
        self.queries = read_queries(queries, self.columns)
        self.kb = read_knowledge_base(kb, self.columns)
        check_image_references(
            self.queries.ids, self.queries.images, self.feature_store, image_root, "queries", require_all=True
        )
        check_kb_images(KBReader(self.kb), self.feature_store, image_root)  # streamed, by Arrow slices
        self.qrels = dict(qrels) if qrels is not None else qrels_from_queries(self.queries, self.kb)
        missing = [q for q in self.queries.ids if q not in self.qrels]
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

    def __len__(self) -> int:
        return len(self.queries)

    @torch.no_grad()
    def run(self, query_model: torch.nn.Module, passage_model: torch.nn.Module | None = None, state: Any = None):
        """The search run `{query_id: {passage_id: score}}` of the model(s) over the KB (None on non-main
        processes of a multi-process `state`)."""
        passage_model = passage_model if passage_model is not None else query_model
        if passage_model.config.similarity != query_model.config.similarity:
            raise ValueError("query and passage models must share one similarity")
        multi = state is not None and state.num_processes > 1
        directory = _shared_temporary_directory(state) if multi else tempfile.mkdtemp(prefix="vl-joint-encoder-eval-")
        try:
            encode_knowledge_base(
                passage_model,
                self.processor,
                self.kb,
                directory,
                shard_size=self.shard_size,
                progress=False,
                state=state if multi else None,
                **self.encode_kwargs,
            )
            if multi and not state.is_main_process:
                return None
            store = EmbeddingStore(directory)
            embeddings = embed_batches(
                query_model, self.processor, self.queries.questions, self.queries.images, **self.encode_kwargs
            )  # (Q, D)
            device = next(query_model.parameters()).device
            scores, positions = search_store(embeddings, store, min(self.k, store.count), device=str(device))
            return to_run(self.queries.ids, scores, positions, store.ids)
        finally:
            if multi:
                state.wait_for_everyone()
            if not multi or state.is_main_process:
                shutil.rmtree(directory, ignore_errors=True)

    def __call__(
        self, query_model: torch.nn.Module, passage_model: torch.nn.Module | None = None, state: Any = None
    ) -> dict[str, float]:
        run = self.run(query_model, passage_model, state)
        metrics = None
        if run is not None:
            qrels = {q: self.qrels[q] for q in self.queries.ids if q in self.qrels}
            metrics = evaluate(qrels, run, self.metrics)
        if state is not None and state.num_processes > 1:
            metrics = _broadcast_from_main(metrics)
        return metrics


def _shared_temporary_directory(state) -> str:
    """A temporary folder made by the main process, its path sent to the others (same machine or shared disk)."""
    path = tempfile.mkdtemp(prefix="vl-joint-encoder-eval-") if state.is_main_process else None
    path = _broadcast_from_main(path)
    if not os.path.isdir(path):
        raise RuntimeError(
            f"process {state.process_index} cannot see the evaluation folder {path!r} of the main process: "
            f"multi-node evaluation needs TMPDIR on a shared disk"
        )
    return path


def _broadcast_from_main(value: Any) -> Any:
    import torch.distributed as dist

    payload = [value]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


__all__ = ["RetrievalEvaluator"]
