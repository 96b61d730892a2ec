"""Encode a knowledge base into embedding shards (`vl-joint-encoder encode`, `encode_knowledge_base`).

- Passages are ordered by text length (longest first) so that a batch holds passages of similar length (less padding,
  as Tevatron / DPR encoders do); each shard records the KB rows it holds, so search reports KB ids and positions.
- A shard is a fixed set of rows encoded in fixed batches, whichever process encodes it: 1 or N processes
  (`accelerate launch ... -m vl_joint_encoder encode ...`, each rank takes shards rank, rank + N, ...) and a resumed
  run give the same embeddings as one uninterrupted process.
- Resumable: shards are written atomically; a re-run with the same arguments skips the complete ones and checks that
  the model and the KB did not change (plan.json). See `retrieval.store` for the format.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

import torch
from transformers.utils import logging

from ..data.feature_stores import feature_store_fingerprint, open_feature_store, referenced_store_keys
from ..data.references import check_image_references
from ..data.tables import ColumnMapping, read_knowledge_base
from ..utils.io import read_json, write_json
from .embed import AUTOCAST_DTYPES, STORAGE_DTYPES, embed_batches, kb_fingerprint, model_fingerprint
from .store import FORMAT, FORMAT_VERSION, IDS, MANIFEST, PLAN, read_shard_metadata, shard_name, write_shard


logger = logging.get_logger(__name__)


def kb_columns(id_column: str | None = "id", text_column: str = "text", image_column: str | None = "image"):
    """The `ColumnMapping` of a KB given by its id / text / image column names (the `encode` options)."""
    return ColumnMapping(passage_id=id_column, passage_text=text_column, passage_image=image_column)


def encode_knowledge_base(
    model: torch.nn.Module,
    processor: Any,
    kb: Any,
    output_dir: str | os.PathLike,
    batch_size: int = 64,
    shard_size: int = 10_000,
    max_length: int = 256,
    sort_by_length: bool = True,
    autocast_dtype: str = "float32",
    storage_dtype: str = "float32",
    id_column: str = "id",
    text_column: str = "text",
    image_column: str | None = "image",
    model_name: str | None = None,
    state: Any = None,
    progress: bool = True,
    feature_store: Any = None,
    image_root: str | None = None,
) -> dict | None:
    """
    Encode `kb` (rows `id`, `text`, optional `image`) with `model` (a JointEncoderModel, or any module with
    `.encode(**batch)` and `.config.similarity`) into `output_dir`. Resumes an interrupted run of the same job.

    `image` cells are file paths (relative to `image_root`), `datasets.Image` cells, PIL images, or keys of
    `feature_store` (precomputed visual features: anything `data.feature_stores.open_feature_store` accepts). Every
    reference is checked before encoding starts; the plan records a hash of the referenced features (and
    `image_root`), so that an encoding is not resumed over a changed store.

    `state`: an `accelerate.PartialState` when launched with several processes (each encodes shards rank, rank +
    world, ...; rank 0 writes the manifest). Returns the manifest on the main process, None on the others.
    """
    from tqdm.auto import tqdm

    if autocast_dtype not in AUTOCAST_DTYPES or storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtypes must be among {list(STORAGE_DTYPES)}, got {autocast_dtype!r} / {storage_dtype!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    is_main = rank == 0
    output_dir = os.fspath(output_dir)
    kb = read_knowledge_base(kb, kb_columns(id_column, text_column, image_column))
    ids, texts, images = kb.passage_ids(), kb.texts(), kb.images()
    store = open_feature_store(feature_store)
    store_path = getattr(store, "path", None)
    check_image_references(ids, images, store, image_root, what="KB passages")
    model_hash = model_fingerprint(model)
    # longest first: memory errors show up on the first batch, and batches pad little
    order = sorted(range(len(texts)), key=lambda r: -len(texts[r])) if sort_by_length else list(range(len(texts)))
    plan = {
        "format": FORMAT,
        "model_sha256": model_hash,
        "kb_fingerprint": kb_fingerprint(ids, texts, images),
        "count": len(ids),
        "shard_size": shard_size,
        "batch_size": batch_size,
        "max_length": max_length,
        "sort_by_length": sort_by_length,
        "autocast_dtype": autocast_dtype,
        "storage_dtype": storage_dtype,
    }
    # only when used, so that plans (and their hashes) of encodings without them stay as they were
    keys = referenced_store_keys(images, store)
    if keys:
        plan["feature_store_sha256"] = feature_store_fingerprint(store, keys)
        plan["feature_store_keys"] = len(keys)
    if image_root is not None:
        plan["image_root"] = os.path.abspath(image_root)
    plan_hash = hashlib.sha256(repr(sorted(plan.items())).encode()).hexdigest()
    plan["plan_hash"] = plan_hash
    _check_or_write_plan(output_dir, plan, is_main, state)

    n_shards = math.ceil(len(ids) / shard_size)
    mine = [s for s in range(rank, n_shards, world)]
    todo = [s for s in mine if not _shard_complete(output_dir, s, plan_hash)]
    if len(todo) < len(mine):
        logger.info(f"rank {rank}: {len(mine) - len(todo)} of {len(mine)} shards already complete, resuming")
    device = next(model.parameters()).device
    model.eval()
    n_rows = sum(len(order[s * shard_size : (s + 1) * shard_size]) for s in todo)
    bar = tqdm(total=n_rows, unit="passage", desc=f"encode (rank {rank})", disable=not progress, position=rank)
    for shard in todo:
        rows = order[shard * shard_size : (shard + 1) * shard_size]
        embeddings = embed_batches(
            model,
            processor,
            [texts[r] for r in rows],
            None if images is None else [images[r] for r in rows],
            batch_size,
            max_length,
            autocast_dtype,
            device,
            feature_store=store,
            image_root=image_root,
        )  # (n, D)
        write_shard(
            output_dir, shard, embeddings.to(STORAGE_DTYPES[storage_dtype]), torch.tensor(rows), plan_hash, model_hash
        )
        bar.update(len(rows))
    bar.close()
    if state is not None:
        state.wait_for_everyone()
    if not is_main:
        return None
    return _finalize(output_dir, plan, ids, model, model_name, n_shards, store_path)


def _check_or_write_plan(output_dir: str, plan: dict, is_main: bool, state: Any) -> None:
    path = os.path.join(output_dir, PLAN)
    if os.path.isfile(path):
        previous = read_json(path, "encoding plan")
        if previous.get("plan_hash") != plan["plan_hash"]:
            changed = [k for k in plan if k != "plan_hash" and previous.get(k) != plan[k]]
            reasons = {
                "kb_fingerprint": "the KB changed since encoding started (ids / texts / images differ)",
                "count": f"the KB has {plan['count']} passages, {previous.get('count')} when encoding started",
                "model_sha256": "the model weights differ from those the shards were encoded with",
                "feature_store_sha256": "the feature store's arrays for the KB's keys differ from those encoded",
            }
            detail = "; ".join(reasons.get(k, f"{k}: {previous.get(k)!r} -> {plan[k]!r}") for k in changed)
            raise ValueError(
                f"{output_dir!r} holds an encoding of a different job ({detail}). Use a new output directory, or "
                f"delete this one to start over"
            )
    elif is_main:
        os.makedirs(output_dir, exist_ok=True)
        write_json(path, plan, indent=1)
    if state is not None:
        state.wait_for_everyone()


def _shard_complete(output_dir: str, shard: int, plan_hash: str) -> bool:
    metadata = read_shard_metadata(os.path.join(output_dir, shard_name(shard)))
    return metadata is not None and metadata.get("plan_hash") == plan_hash


def _finalize(
    output_dir: str,
    plan: dict,
    ids: list[str],
    model,
    model_name: str | None,
    n_shards: int,
    store_path: str | None = None,
) -> dict:
    shards = []
    for shard in range(n_shards):
        metadata = read_shard_metadata(os.path.join(output_dir, shard_name(shard)))
        if metadata is None or metadata.get("plan_hash") != plan["plan_hash"]:
            raise RuntimeError(f"shard {shard} is missing after encoding: a process failed; re-run to resume")
        shards.append({"file": shard_name(shard), "rows": int(metadata["rows"]), "sha256": metadata["sha256"]})
    config = model.config
    write_json(os.path.join(output_dir, IDS), ids, indent=1)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {
            "name_or_path": model_name or getattr(config, "_name_or_path", "") or "",
            "revision": getattr(config, "_commit_hash", None),
            "sha256": plan["model_sha256"],
        },
        "similarity": config.similarity,
        # model.encode L2-normalises for cosine models: search then scores with unit-norm passages
        "normalized": (config.similarity == "cosine" or bool(getattr(config, "normalize", False)))
        and plan["storage_dtype"] == "float32",
        "dim": int(config.embedding_dim),
        "dtype": plan["storage_dtype"],
        "count": plan["count"],
        "kb_fingerprint": plan["kb_fingerprint"],
        "plan_hash": plan["plan_hash"],
        "shards": shards,
    }
    if "feature_store_sha256" in plan:
        manifest["feature_store"] = {
            "path": store_path,
            "sha256": plan["feature_store_sha256"],
            "keys": plan["feature_store_keys"],
        }
    if "image_root" in plan:
        manifest["image_root"] = plan["image_root"]
    write_json(os.path.join(output_dir, MANIFEST), manifest, indent=1)
    logger.info(f"encoded {plan['count']} passages into {n_shards} shards in {output_dir}")
    return manifest


def check_knowledge_base(output_dir: str | os.PathLike, kb: Any, feature_store: Any = None, **columns) -> None:
    """
    Raise a ValueError if `kb` is not the KB encoded in `output_dir` (count or content fingerprint differ) or, given
    `feature_store`, if its features for the KB's keys are not those encoded.
    """
    manifest = read_json(os.path.join(output_dir, MANIFEST), "embeddings manifest")
    kb = read_knowledge_base(kb, kb_columns(**columns))
    ids, texts, images = kb.passage_ids(), kb.texts(), kb.images()
    if len(ids) != manifest["count"]:
        raise ValueError(f"the KB has {len(ids)} passages but {output_dir} encodes {manifest['count']}: re-encode it")
    if kb_fingerprint(ids, texts, images) != manifest["kb_fingerprint"]:
        raise ValueError(f"the KB changed since it was encoded into {output_dir} (same count, different content)")
    store = open_feature_store(feature_store)
    recorded = manifest.get("feature_store", {}).get("sha256")
    if store is not None and recorded is not None:
        if feature_store_fingerprint(store, referenced_store_keys(images, store)) != recorded:
            raise ValueError(f"the feature store's features of the KB's keys differ from those encoded in {output_dir}")


__all__ = ["check_knowledge_base", "encode_knowledge_base", "kb_columns"]
