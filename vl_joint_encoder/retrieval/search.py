"""Search encoded shards: exact torch top-k, or a FAISS index, with the model's similarity.

Scores always use the similarity the model was trained with (`similarity_scores`, from the model config recorded in
the manifest): a cosine model is searched with cosine, never raw dot products. Exact search orders ties by corpus
position (KB row) ascending (`exact_search`).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers.utils import logging

from ..bi_encoder import is_bi_encoder_dir
from ..utils.io import atomic_path, read_json, write_json
from .embed import load_model_and_processor, model_fingerprint
from .exact_search import auto_chunk_rows, exact_top_k
from .store import EmbeddingStore


logger = logging.get_logger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw")
FAISS_INDEX = "faiss.index"
FAISS_META = "index.json"
FAISS_POSITIONS = "positions.npy"


# ------------------------------------------------------------------------------------------------ checks
def check_model_matches(store_similarity: str, store_model_hash: str, passage_model: torch.nn.Module, where: str):
    """Refuse a (query model, shards) pair whose passage encoder or similarity differ from the encoded ones."""
    similarity = passage_model.config.similarity
    if similarity != store_similarity:
        raise ValueError(
            f"{where} was encoded for similarity {store_similarity!r} but the model uses {similarity!r}: "
            f"search with the model that encoded it"
        )
    if model_fingerprint(passage_model) != store_model_hash:
        raise ValueError(
            f"{where} was encoded by another model (weights hash {store_model_hash[:12]}...): re-encode the KB with "
            f"this model, or search with the model that encoded it"
        )


# ------------------------------------------------------------------------------------------------ search
def search_store(
    query_embeddings: torch.Tensor,
    store: EmbeddingStore,
    k: int,
    device: str | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the store's shards: (scores (Q, k'), KB positions (Q, k')), k' = min(k, count)."""
    if k > store.count:
        logger.warning(f"k={k} is larger than the KB ({store.count} passages): returning {store.count} per query")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    chunk_rows = chunk_rows or auto_chunk_rows(query_embeddings.shape[0])
    return exact_top_k(
        query_embeddings,
        store.chunks(chunk_rows),
        min(k, store.count),
        store.similarity,
        device,
        passages_normalized=store.normalized,
    )


# ------------------------------------------------------------------------------------------------ FAISS
def build_faiss_index(
    store: EmbeddingStore,
    kind: str = "flat",
    nlist: int = 1024,
    hnsw_m: int = 32,
    train_size: int = 262_144,
    seed: int = 0,
):
    """A FAISS inner-product index over the store (vectors L2-normalised first for cosine) + row -> KB position."""
    import faiss

    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
    dim, metric = store.dim, faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, metric)
    else:
        nlist = min(nlist, store.count)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, metric)
        sample, _ = store.load_all() if store.count <= train_size else _sample(store, train_size, seed)
        index.train(_prepare(sample, store.similarity))
    positions = []
    for embeddings, chunk_positions in store.chunks(65_536):
        index.add(_prepare(embeddings, store.similarity))
        positions.append(chunk_positions.numpy())
    return index, np.concatenate(positions)


def _sample(store: EmbeddingStore, size: int, seed: int) -> tuple[torch.Tensor, None]:
    rows = set(np.random.default_rng(seed).choice(store.count, size, replace=False).tolist())
    picked = [emb[[p in rows for p in pos.tolist()]] for emb, pos in store.chunks()]
    return torch.cat(picked), None


def _prepare(embeddings: torch.Tensor, similarity: str) -> np.ndarray:
    import faiss

    array = np.ascontiguousarray(embeddings.float().numpy())
    if similarity == "cosine":  # cosine = inner product of unit vectors
        faiss.normalize_L2(array)
    return array


def save_faiss_index(index, positions: np.ndarray, store: EmbeddingStore, output_dir: str, kind: str) -> None:
    import faiss

    with atomic_path(os.path.join(output_dir, FAISS_INDEX)) as tmp:
        faiss.write_index(index, tmp)
    with atomic_path(os.path.join(output_dir, FAISS_POSITIONS)) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, positions)
    meta = {
        "kind": kind,
        "count": store.count,
        "ntotal": int(index.ntotal),
        "similarity": store.similarity,
        "model_sha256": store.model_hash,
        "kb_fingerprint": store.manifest.get("kb_fingerprint"),
        "plan_hash": store.manifest.get("plan_hash"),
        "embeddings": os.path.abspath(store.directory),
    }
    write_json(os.path.join(output_dir, FAISS_META), meta, indent=1)


def check_index_matches(meta: dict, index, positions: np.ndarray, store: EmbeddingStore, index_dir: str) -> None:
    """Refuse an index built over other embeddings than `store` (another model, another KB or KB size, another
    encoding), or whose files disagree with each other."""
    fix = f"rebuild it: vl-joint-encoder index --embeddings {store.directory} --output_dir {index_dir}"
    differences = []
    if meta.get("model_sha256") != store.model_hash or meta.get("similarity") != store.similarity:
        differences.append("another model")
    if meta.get("count") != store.count:
        differences.append(f"{meta.get('count')} passages, the embeddings hold {store.count}")
    if "kb_fingerprint" not in meta:
        differences.append("no KB fingerprint (built by an earlier version)")
    elif meta["kb_fingerprint"] != store.manifest.get("kb_fingerprint") or meta.get("plan_hash") != store.manifest.get(
        "plan_hash"
    ):
        differences.append("another KB or encoding")
    if differences:
        raise ValueError(f"the index {index_dir!r} was built over other embeddings than {store.directory!r} "
                         f"({'; '.join(differences)}): {fix}")  # fmt: skip
    if (
        int(index.ntotal) != len(positions)
        or len(positions) != store.count
        or (len(positions) and (positions.min() < 0 or positions.max() >= store.count))
    ):
        raise ValueError(
            f"the index {index_dir!r} is inconsistent ({index.ntotal} vectors, {len(positions)} positions, "
            f"{store.count} passages): {fix}"
        )


def faiss_search(
    index_dir: str,
    query_embeddings: torch.Tensor,
    k: int,
    nprobe: int = 32,
    ef_search: int = 128,
    store: EmbeddingStore | None = None,
):
    """(scores (Q, k'), KB positions (Q, k'), meta) from an index written by `vl-joint-encoder index`; given the
    `store` it was built over, `check_index_matches` first."""
    import faiss

    meta = read_json(os.path.join(index_dir, FAISS_META), "index metadata")
    index = faiss.read_index(os.path.join(index_dir, FAISS_INDEX))
    positions = np.load(os.path.join(index_dir, FAISS_POSITIONS), allow_pickle=False)
    if store is not None:
        check_index_matches(meta, index, positions, store, index_dir)
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(ef_search, k)
    k = min(k, meta["count"])
    scores, rows = index.search(_prepare(query_embeddings, meta["similarity"]), k)
    valid = rows >= 0  # IVF / HNSW may return fewer than k
    return torch.from_numpy(scores), torch.from_numpy(np.where(valid, positions[np.maximum(rows, 0)], -1)), meta


def load_search_models(path: str, processor_path: str | None = None):
    """(query model, passage model, processor) in eval mode, from a shared-tower model or a separate-towers folder."""
    query_model, processor = load_model_and_processor(path, tower="query_encoder", processor_path=processor_path)
    passage_model = query_model
    if is_bi_encoder_dir(path):
        passage_model = load_model_and_processor(path, tower="passage_encoder", processor_path=processor_path)[0]
    return query_model.eval(), passage_model.eval(), processor


__all__ = [
    "INDEX_KINDS",
    "build_faiss_index",
    "check_index_matches",
    "check_model_matches",
    "faiss_search",
    "load_search_models",
    "save_faiss_index",
    "search_store",
]
