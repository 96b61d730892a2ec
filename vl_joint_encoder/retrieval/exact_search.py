"""Exact top-k search with torch, chunked over the corpus, with the model's similarity and deterministic ties.

Order: score descending, then corpus position ascending (the passage's row in the knowledge base). A top-k is a set
with a well-defined order even when scores tie (duplicated passages have identical embeddings), so two runs, two
chunk sizes, one or several devices give the same ids in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from ..modeling_joint_encoder import similarity_scores


# scores computed at once per chunk: queries x chunk_rows floats (bounded memory, large enough for BLAS)
DEFAULT_MAX_CHUNK_ELEMENTS = 2**26  # 256 MiB of float32 scores
MIN_CHUNK_ROWS = 4096


def auto_chunk_rows(n_queries: int, max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> int:
    """Corpus rows scored at once so that the (queries, rows) score block stays under `max_chunk_elements`."""
    return max(MIN_CHUNK_ROWS, max_chunk_elements // max(1, n_queries))


def _order_candidates(scores: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (score desc, position asc): stable sort on position, then stable sort on score."""
    by_position = torch.sort(positions, dim=1, stable=True).indices  # (Q, n)
    scores, positions = scores.gather(1, by_position), positions.gather(1, by_position)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (Q, n)
    return scores.gather(1, by_score), positions.gather(1, by_score)


def chunk_top_k(scores: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Top-k of a (Q, C) score block whose columns are corpus `positions` (C,), ordered by (score desc, position asc).
    `torch.topk` picks arbitrarily among scores equal to the k-th, so it is asked for k + 1: a row whose (k+1)-th
    score equals its k-th has a tie straddling the cut, and is redone exactly from all candidates >= the k-th score
    (rare: row by row). This costs no pass over the block besides the matmul and the top-k.
    """
    columns = scores.shape[1]
    if k >= columns:  # every column is kept: no cut, no tie at it
        return _order_candidates(scores, positions.expand(scores.shape[0], -1))
    top_scores, top_columns = torch.topk(scores, k + 1, dim=1, sorted=True)  # (Q, k + 1), descending
    tied = torch.nonzero(top_scores[:, k - 1] == top_scores[:, k]).flatten().tolist()
    top_scores, top_positions = _order_candidates(top_scores[:, :k], positions[top_columns[:, :k]])
    for row in tied:
        kth = top_scores[row, k - 1]
        columns = torch.nonzero(scores[row] >= kth).flatten()  # (m,) with m > k
        row_scores, row_positions = _order_candidates(scores[row, columns][None], positions[columns][None])
        top_scores[row], top_positions[row] = row_scores[0, :k], row_positions[0, :k]
    return top_scores, top_positions


def merge_top_k(
    best: tuple[torch.Tensor, torch.Tensor] | None, candidates: tuple[torch.Tensor, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two (Q, *) sorted candidate lists into the (Q, <=k) best, ordered by (score desc, position asc)."""
    if best is None:
        return candidates
    scores = torch.cat([best[0], candidates[0]], dim=1)  # (Q, k + k')
    positions = torch.cat([best[1], candidates[1]], dim=1)  # (Q, k + k')
    scores, positions = _order_candidates(scores, positions)
    return scores[:, :k], positions[:, :k]


@torch.no_grad()
def exact_top_k(
    queries: torch.Tensor,
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]],
    k: int,
    similarity: str,
    device: str | torch.device | None = None,
    passages_normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Exact top-k of `queries` (Q, D) over a corpus given as chunks of (embeddings (C, D), positions (C,) int64).

    Scores are `similarity_scores(queries, chunk, similarity)` (the function the training loss uses), computed in
    float32 on `device`. With `passages_normalized=True` (the shards were L2-normalised at encoding time, as
    `encode` does for cosine models) cosine skips re-normalising every chunk: the queries are normalised once and
    scored by the dot product with the unit-norm passages, which is the cosine.

    Returns (scores (Q, k), positions (Q, k) int64) ordered by score descending then position ascending; k is capped
    at the corpus size.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = torch.device(device) if device is not None else queries.device
    queries = queries.to(device=device, dtype=torch.float32)  # (Q, D)
    metric = similarity
    if similarity == "cosine" and passages_normalized:
        queries = torch.nn.functional.normalize(queries, p=2, dim=-1)
        metric = "dot"
    best = None
    for embeddings, positions in chunks:
        if embeddings.shape[-1] != queries.shape[-1]:
            raise ValueError(
                f"passage embeddings have dimension {embeddings.shape[-1]} but queries have {queries.shape[-1]}: "
                f"encode queries and passages with the same model"
            )
        embeddings = embeddings.to(device=device, dtype=torch.float32, non_blocking=True)  # (C, D)
        positions = positions.to(device=device)  # (C,)
        scores = similarity_scores(queries, embeddings, metric)  # (Q, C)
        best = merge_top_k(best, chunk_top_k(scores, positions, k), k)
    if best is None:
        raise ValueError("the corpus is empty: encode a non-empty knowledge base first")
    return best


def tensor_chunks(
    embeddings: torch.Tensor, chunk_rows: int, positions: torch.Tensor | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Chunks of an in-memory (N, D) matrix; positions default to 0..N-1, made on the matrix's device (a corpus held
    on the GPU then needs no host-to-device copy of its positions at every search)."""
    if positions is None:
        positions = torch.arange(embeddings.shape[0], dtype=torch.int64, device=embeddings.device)
    for start in range(0, embeddings.shape[0], chunk_rows):
        yield embeddings[start : start + chunk_rows], positions[start : start + chunk_rows]


__all__ = ["exact_top_k", "tensor_chunks", "chunk_top_k", "merge_top_k", "auto_chunk_rows"]
