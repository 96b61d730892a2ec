"""Search a toy-world split with the package's own encoder, search and metrics (what `encode`, `search` and
`evaluate` do on files), in memory except for the KB embedding shards."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import torch

from ..embedding_store import EmbeddingStore
from ..encode import encode_knowledge_base
from ..ir_metrics import evaluate
from ..search import encode_queries, search_store, to_run


METRICS = ("mrr@10", "recall@1", "recall@10")


def _strip_images(rows: Sequence[dict], keep: Sequence[str]) -> list[dict]:
    return [{key: row[key] for key in keep} for row in rows]


@torch.no_grad()
def search_split(
    model,
    processor,
    kb: Sequence[dict],
    queries: Sequence[dict],
    embeddings_dir: str | None = None,
    use_images: bool = True,
    k: int = 10,
    batch_size: int = 128,
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """
    Encode `kb` into `embeddings_dir` (a temporary folder if None) with `encode_knowledge_base`, encode the queries,
    search exactly with the model's similarity and return the run `{query id: {passage id: score}}`.
    `use_images=False` removes every image, from the queries and from the passages (the text-only ablation).
    """
    if not use_images:
        kb = _strip_images(kb, ("id", "text"))
        queries = _strip_images(queries, ("id", "question"))
    model.eval()
    with tempfile.TemporaryDirectory(prefix="vl-demo-kb-") as scratch:
        directory = embeddings_dir or os.path.join(scratch, "kb")
        encode_knowledge_base(
            model, processor, list(kb), directory, batch_size=batch_size, max_length=64, progress=False,
            image_column="image" if use_images else None,
        )
        store = EmbeddingStore(directory)
        images = [row["image"] for row in queries] if use_images else None
        query_embeddings = encode_queries(
            model, processor, [row["question"] for row in queries], images, batch_size=batch_size, max_length=64
        )  # (Q, D)
        scores, positions = search_store(query_embeddings, store, k=k, device=device)  # (Q, k)
        return to_run([row["id"] for row in queries], scores, positions, store.ids)


def split_metrics(run: dict, queries: Sequence[dict], metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """The package's metrics (equal to ranx's) of a run against the split's qrels."""
    qrels = {row["id"]: {pid: 1 for pid in row["positive_ids"]} for row in queries}
    return evaluate(qrels, run, list(metrics))


class SplitEvaluator:
    """`evaluator(model) -> {"mrr@10": ...}` for `JointEncoderTrainer(evaluator=...)`: MRR@10 on one split."""

    def __init__(self, processor, kb: Sequence[dict], queries: Sequence[dict], device: str = "cpu"):
        self.processor, self.kb, self.queries, self.device = processor, kb, queries, device

    def __call__(self, model) -> dict[str, float]:
        run = search_split(model, self.processor, self.kb, self.queries, device=self.device)
        return split_metrics(run, self.queries)


__all__ = ["METRICS", "SplitEvaluator", "search_split", "split_metrics"]
