"""Search encoded shards: `vl-joint-encoder search` (exact torch top-k or a FAISS index) and `vl-joint-encoder index`.

Scores always use the similarity the model was trained with (`similarity_scores`, from the model config recorded in
the manifest): a cosine model is searched with cosine, never raw dot products. Exact search orders ties by corpus
position (KB row) ascending. Runs are written as ranx JSON (`.json`: query id -> passage id -> score) or TREC
(`qid Q0 pid rank score tag`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from .embedding_store import EmbeddingStore, atomic_write_json, read_json
from .encode import embed_batches, model_fingerprint
from .exact_search import auto_chunk_rows, exact_top_k
from .visual_references import describe_store, open_feature_store, unresolvable_references


logger = logging.get_logger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw")
FAISS_INDEX = "faiss.index"
FAISS_META = "index.json"


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


# ------------------------------------------------------------------------------------------------ queries
def read_queries(
    queries: Any,
    id_column: str = "id",
    text_column: str = "question",
    image_column: str | None = "image",
    feature_store: Any = None,
    image_root: str | None = None,
) -> tuple[list[str], list[str], list[Any] | None]:
    """
    (ids, questions, images or None); every query must have its image when the table has an image column: a file
    (relative to `image_root`), a PIL image / `datasets.Image` cell, or a key of `feature_store` (path or mapping).
    """
    from .data import _lazy_images, load_table

    table = _lazy_images(load_table(queries, name="the queries"), image_column)
    if len(table) == 0:
        raise ValueError("no queries to search")
    missing = [c for c in (id_column, text_column) if c not in table.column_names]
    if missing:
        raise ValueError(f"the queries lack column(s) {missing}; they have {table.column_names}")
    ids = [str(i) for i in table[id_column]]
    texts = table[text_column]
    images = None
    if image_column is not None and image_column in table.column_names:
        images = table[image_column]
        store, store_path = open_feature_store(feature_store)
        unresolved = set(unresolvable_references(images, store, image_root))
        absent = [r for r, image in enumerate(images) if image is None or r in unresolved or _empty_cell(image)]
        if absent:
            examples = ", ".join(f"{ids[r]}: {_shown(images[r])!r}" for r in absent[:5])
            store_hint = f" nor a key of {describe_store(store_path)}" if store is not None else ""
            root_hint = f" under image_root {image_root!r}" if image_root else ""
            raise ValueError(
                f"{len(absent)} queries have no image (or its reference is neither an existing file{root_hint}"
                f"{store_hint}), e.g. {examples}: fix the paths / keys, pass --image_root / --feature_store, or drop "
                f"the image column to search with text only"
            )
    return ids, texts, images


def _empty_cell(image: Any) -> bool:
    return isinstance(image, dict) and not image.get("bytes") and not image.get("path")


def _shown(image: Any) -> Any:
    return image.get("path") if isinstance(image, dict) else image


def encode_queries(
    model,
    processor,
    texts: Sequence[str],
    images=None,
    batch_size: int = 64,
    max_length: int = 256,
    autocast_dtype: str = "float32",
    feature_store: Any = None,
    image_root: str | None = None,
) -> torch.Tensor:
    """
    (Q, D) float32 query embeddings, with the batch code of passages and of training (`JointEncoderInputBuilder`).
    `images`: per query a file path (relative to `image_root`), PIL image, key of `feature_store`, or None.
    """
    return embed_batches(
        model,
        processor,
        texts,
        images,
        batch_size,
        max_length,
        autocast_dtype,
        feature_store=feature_store,
        image_root=image_root,
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


def to_run(query_ids: Sequence[str], scores: torch.Tensor, positions: torch.Tensor, passage_ids: Sequence[str]):
    """{query_id: {passage_id: score}} in rank order (ranx JSON run)."""
    run = {}
    for query_id, row_scores, row_positions in zip(query_ids, scores.tolist(), positions.tolist()):
        run[query_id] = {passage_ids[p]: float(s) for s, p in zip(row_scores, row_positions)}
    return run


def write_run(run: dict[str, dict[str, float]], path: str | os.PathLike, tag: str = "vl-joint-encoder") -> None:
    """ranx JSON if `path` ends in .json, TREC run format otherwise; written atomically."""
    path = os.fspath(path)
    if path.endswith(".json"):
        atomic_write_json(path, run)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for query_id, passages in run.items():
            for rank, (passage_id, score) in enumerate(passages.items(), 1):
                f.write(f"{query_id} Q0 {passage_id} {rank} {score!r} {tag}\n")
    os.replace(tmp, path)


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

    os.makedirs(output_dir, exist_ok=True)
    tmp = os.path.join(output_dir, f"{FAISS_INDEX}.tmp-{os.getpid()}")
    faiss.write_index(index, tmp)
    os.replace(tmp, os.path.join(output_dir, FAISS_INDEX))
    np.save(os.path.join(output_dir, "positions.npy"), positions)
    meta = {
        "kind": kind,
        "count": store.count,
        "similarity": store.similarity,
        "model_sha256": store.model_hash,
        "embeddings": os.path.abspath(store.directory),
    }
    atomic_write_json(os.path.join(output_dir, FAISS_META), meta)


def faiss_search(index_dir: str, query_embeddings: torch.Tensor, k: int, nprobe: int = 32, ef_search: int = 128):
    """(scores (Q, k'), KB positions (Q, k'), meta) from an index written by `vl-joint-encoder index`."""
    import faiss

    meta = read_json(os.path.join(index_dir, FAISS_META))
    index = faiss.read_index(os.path.join(index_dir, FAISS_INDEX))
    positions = np.load(os.path.join(index_dir, "positions.npy"))
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(ef_search, k)
    k = min(k, meta["count"])
    scores, rows = index.search(_prepare(query_embeddings, meta["similarity"]), k)
    valid = rows >= 0  # IVF / HNSW may return fewer than k
    return torch.from_numpy(scores), torch.from_numpy(np.where(valid, positions[np.maximum(rows, 0)], -1)), meta


# ------------------------------------------------------------------------------------------------ CLIs
def _query_model(path: str, processor_path: str | None):
    """(query model, passage model, processor) from a shared-tower model or a bi-encoder folder."""
    from .bi_encoder import is_bi_encoder_dir
    from .encode import load_encoder

    query_model, processor = load_encoder(path, tower="query_encoder", processor_path=processor_path)
    passage_model = (
        load_encoder(path, "passage_encoder", processor_path)[0] if is_bi_encoder_dir(path) else query_model
    )
    return query_model.eval(), passage_model.eval(), processor


def search_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vl-joint-encoder search", description="Top-k search of queries over an encoded KB."
    )
    parser.add_argument("--model", required=True, help="the model (or bi-encoder folder) that encoded the KB")
    parser.add_argument("--queries", required=True, help="queries file(s) / folder: id, question, optional image")
    parser.add_argument("--embeddings", required=True, help="folder written by `vl-joint-encoder encode`")
    parser.add_argument(
        "--index", help="FAISS index folder written by `vl-joint-encoder index` (default: exact search)"
    )
    parser.add_argument("--output", required=True, help="run file: .json (ranx) or anything else (TREC)")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--processor")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--id_column", default="id")
    parser.add_argument("--question_column", default="question")
    parser.add_argument("--image_column", default="image")
    parser.add_argument(
        "--feature_store",
        help="precomputed visual features (.npz / .safetensors, or an extract-features folder); query images "
        "that are its keys use them",
    )
    parser.add_argument("--image_root", help="folder that relative image paths are relative to")
    parser.add_argument("--nprobe", type=int, default=32)
    from vl_joint_encoder.cli import accept_both_spellings

    args = accept_both_spellings(parser).parse_args(argv)
    try:
        if args.k < 1:
            raise ValueError(f"--k must be >= 1, got {args.k}")
        store = EmbeddingStore(args.embeddings)
        query_model, passage_model, processor = _query_model(args.model, args.processor)
        check_model_matches(store.similarity, store.model_hash, passage_model, args.embeddings)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        query_model.to(device)
        feature_store, _ = open_feature_store(args.feature_store)
        ids, texts, images = read_queries(
            args.queries, args.id_column, args.question_column, args.image_column, feature_store, args.image_root
        )
        embeddings = encode_queries(
            query_model,
            processor,
            texts,
            images,
            args.batch_size,
            args.max_length,
            feature_store=feature_store,
            image_root=args.image_root,
        )
        if args.index:
            scores, positions, meta = faiss_search(args.index, embeddings, args.k, nprobe=args.nprobe)
            if meta["model_sha256"] != store.model_hash or meta["similarity"] != store.similarity:
                raise ValueError(f"{args.index} indexes other embeddings than {args.embeddings}: rebuild the index")
        else:
            scores, positions = search_store(embeddings, store, args.k, device=device)
        run = (
            to_run(ids, scores, positions, store.ids)
            if not args.index
            else _faiss_run(ids, scores, positions, store.ids)
        )
        write_run(run, args.output)
    except (ValueError, OSError) as error:
        print(f"vl-joint-encoder search: error: {error}", file=sys.stderr)
        return 2
    print(f"searched {len(ids)} queries over {store.count} passages (top {min(args.k, store.count)}) -> {args.output}")
    return 0


def _faiss_run(query_ids, scores, positions, passage_ids):
    run = {}
    for query_id, row_scores, row_positions in zip(query_ids, scores.tolist(), positions.tolist()):
        run[query_id] = {passage_ids[p]: float(s) for s, p in zip(row_scores, row_positions) if p >= 0}
    return run


def index_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vl-joint-encoder index", description="Build a FAISS index over encoded shards."
    )
    parser.add_argument("--embeddings", required=True, help="folder written by `vl-joint-encoder encode`")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--kind", choices=INDEX_KINDS, default="flat")
    parser.add_argument("--nlist", type=int, default=1024, help="IVF lists")
    parser.add_argument("--hnsw_m", type=int, default=32, help="HNSW neighbours per node")
    from vl_joint_encoder.cli import accept_both_spellings

    args = accept_both_spellings(parser).parse_args(argv)
    try:
        store = EmbeddingStore(args.embeddings)
        index, positions = build_faiss_index(store, args.kind, args.nlist, args.hnsw_m)
        save_faiss_index(index, positions, store, args.output_dir, args.kind)
    except ImportError:
        print("vl-joint-encoder index: error: faiss is not installed (pip install faiss-cpu)", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:
        print(f"vl-joint-encoder index: error: {error}", file=sys.stderr)
        return 2
    print(f"{args.kind} index over {store.count} passages ({store.similarity}) -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(search_main())
