"""Encode a knowledge base into embedding shards (`vl-joint-encoder encode`, `encode_knowledge_base`).

- Shard s holds the contiguous KB rows [s * shard_size, (s + 1) * shard_size), ordered inside by text length
  (longest first, ties in row order) so that a batch holds passages of similar length (less padding, as Tevatron /
  DPR encoders do); each shard records the KB rows it holds, so search reports KB ids and positions. No pass sorts
  or reads the whole KB at once: every pass is a sequence of Arrow slices (`kb_reader.KBReader`), so the cost per
  passage and the memory do not grow with the KB, and the first batch starts after one shard is read.
- A shard is a fixed set of rows encoded in fixed batches, whichever process encodes it: 1 or N processes
  (`accelerate launch ... -m vl_joint_encoder encode ...`, each rank takes shards rank, rank + N, ...) and a resumed
  run compute the same batches as one uninterrupted process. Their embeddings are then the same bits on the same
  device type with the same kernels: on CPU, with the same number of threads per process (a matmul's reduction order,
  and so its last bits, depends on how many threads split it).
- Reading, tokenising and image loading of the next batches run in a background thread during the forward
  (`embed.prefetch`).
- Resumable: shards are written atomically, each with the fingerprint of its rows (ids, texts, image references, image
  files' size and mtime, referenced feature-store arrays). A re-run with the same arguments checks every complete
  shard (checksums of its tensors, fingerprint of its rows in today's KB) and keeps it, re-encodes a corrupted one,
  and refuses a changed KB or model (plan.json). See `retrieval.store` for the format.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable
from typing import Any

import torch
from transformers.utils import logging

from ..data.feature_stores import open_feature_store
from ..data.inputs import JointEncoderInputBuilder
from ..data.references import (
    IMAGE_FILE,
    MISSING,
    NONE,
    STORE_KEY,
    check_image_references,
    classify,
    resolve_visual,
)
from ..data.tables import ColumnMapping, read_knowledge_base
from ..utils.io import read_json, write_json
from .embed import AUTOCAST_DTYPES, STORAGE_DTYPES, check_max_length, forward_batch, model_fingerprint, prefetch
from .kb_reader import (
    FINGERPRINT_VERSION,
    READ_ROWS,
    KBReader,
    PassageRange,
    combine_fingerprints,
    features_fingerprint,
    rows_fingerprint,
)
from .store import (
    FORMAT,
    FORMAT_VERSION,
    IDS,
    MANIFEST,
    PLAN,
    check_output_dir,
    file_sha256,
    load_shard,
    manifest_checksum,
    metadata_checksum,
    read_shard_metadata,
    shard_name,
    write_ids,
    write_shard,
)


logger = logging.get_logger(__name__)

LAYOUT = "contiguous-shards"  # shard s = KB rows [s * shard_size, (s + 1) * shard_size), length-sorted inside


def kb_columns(id_column: str | None = "id", text_column: str = "text", image_column: str | None = "image"):
    """The `ColumnMapping` of a KB given by its id / text / image column names (the `encode` options)."""
    return ColumnMapping(passage_id=id_column, passage_text=text_column, passage_image=image_column)


class ShardFeatureCache:
    """
    A feature store seen through a cache of the current shard's entries: the fingerprint of a shard reads each
    referenced key once, and its batches reuse those arrays (passages sharing an image read it once per shard).
    """

    def __init__(self, store: Any):
        self.store = store
        self.path = getattr(store, "path", None)
        self._entries: dict[str, Any] = {}

    def clear(self) -> None:
        self._entries = {}

    def __contains__(self, key: object) -> bool:
        return key in self.store

    def __getitem__(self, key: str):
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self.store[key]
        return entry

    def __len__(self) -> int:
        return len(self.store)

    def keys(self):
        return self.store.keys()


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
    require_feature_store_match: bool = False,
    prefetch_batches: int = 4,
    cache_images: bool = True,
) -> dict | None:
    """
    Encode `kb` (rows `id`, `text`, optional `image`) with `model` (a JointEncoderModel, or any module with
    `.encode(**batch)` and `.config.similarity`) into `output_dir`. Resumes an interrupted run of the same job.

    `image` cells are file paths (relative to `image_root`), `datasets.Image` cells, PIL images, or keys of
    `feature_store` (precomputed visual features: anything `data.feature_stores.open_feature_store` accepts). Every
    reference is checked before encoding starts. When some image cells are not keys of the store, it says how many;
    with `require_feature_store_match` (the `encode` command), a store that no image cell references is an error.

    `output_dir` must be new, empty, or an encoding of this job (resumed): a folder written by another tool is
    refused, never written into.

    `cache_images`: an image file shared by several passages of a shard (an article's image) is decoded once per
    shard; the same decoded image goes to the processor, so the shards are the same bits as with `False`.

    `state`: an `accelerate.PartialState` when launched with several processes (each encodes shards rank, rank +
    world, ...; rank 0 writes the manifest). Returns the manifest on the main process, None on the others.
    """
    from tqdm.auto import tqdm

    if autocast_dtype not in AUTOCAST_DTYPES or storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtypes must be among {list(STORAGE_DTYPES)}, got {autocast_dtype!r} / {storage_dtype!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    check_max_length(max_length)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    is_main = rank == 0
    output_dir = os.fspath(output_dir)
    check_output_dir(output_dir)
    kb = read_knowledge_base(kb, kb_columns(id_column, text_column, image_column), progress=progress and is_main)
    reader = KBReader(kb)
    store = open_feature_store(feature_store)
    store_path = getattr(store, "path", None)
    n_store_keys = check_kb_images(reader, store, image_root, require_feature_store_match, progress and is_main)
    cached_store = ShardFeatureCache(store) if store is not None and reader.has_images else None
    model_hash = model_fingerprint(model)
    plan = {
        "format": FORMAT,
        "layout": LAYOUT,
        "fingerprint_version": FINGERPRINT_VERSION,
        "model_sha256": model_hash,
        "count": len(reader),
        "shard_size": shard_size,
        "batch_size": batch_size,
        "max_length": max_length,
        "sort_by_length": sort_by_length,
        "autocast_dtype": autocast_dtype,
        "storage_dtype": storage_dtype,
    }
    if image_root is not None:  # only when used, so that plans of encodings without it stay as they were
        plan["image_root"] = os.path.abspath(image_root)
    plan_hash = hashlib.sha256(repr(sorted(plan.items())).encode()).hexdigest()
    plan["plan_hash"] = plan_hash
    _check_or_write_plan(output_dir, plan, is_main, state)

    n_shards = math.ceil(len(reader) / shard_size)
    mine = list(range(rank, n_shards, world))
    device = next(model.parameters()).device
    model.eval()
    config = getattr(model, "config", None)
    build = JointEncoderInputBuilder(
        processor, max_length, cached_store or store, image_root, getattr(config, "feat_dim", None),
        expected_features=getattr(config, "visual_features", None), n_images=getattr(config, "n_images", 1) or 1,
    )  # fmt: skip
    fingerprint_store = cached_store or store

    def shard_rows(shard: int) -> PassageRange:
        if cached_store is not None:
            cached_store.clear()
        return reader.read(shard * shard_size, (shard + 1) * shard_size)

    # 1. complete shards of an earlier run: checked (checksums, fingerprint of their rows in today's KB), kept
    todo = []
    complete = [s for s in mine if _shard_metadata(output_dir, s, plan_hash) is not None]
    check_bar = tqdm(total=len(complete), unit="shard", desc=f"check complete shards (rank {rank})",
                     disable=not progress or not complete, position=rank)  # fmt: skip
    for shard in mine:
        metadata = _shard_metadata(output_dir, shard, plan_hash)
        if metadata is None:
            todo.append(shard)
            continue
        if not _verify_complete_shard(output_dir, shard, metadata, shard_rows(shard), fingerprint_store, image_root):
            todo.append(shard)
        check_bar.update(1)
    check_bar.close()
    if len(todo) < len(mine):
        logger.info(f"rank {rank}: {len(mine) - len(todo)} of {len(mine)} shards already complete, resuming")

    # 2. the others: rows read, fingerprinted, length-sorted and tokenised in a background thread during the forward
    def work():
        for shard in todo:
            rows = shard_rows(shard)
            kb_sha = rows_fingerprint(rows, fingerprint_store, image_root)
            features_sha = features_fingerprint(rows, fingerprint_store)
            order = _length_order(rows.texts) if sort_by_length else list(range(len(rows.texts)))
            decoded: dict = {}  # this shard's decoded image files, by reference
            for start in range(0, len(order), batch_size):
                picked = order[start : start + batch_size]
                texts = [rows.texts[i] for i in picked]
                images = None if rows.images is None else [rows.images[i] for i in picked]
                if images is not None and cache_images:
                    images = [_decoded_image(image, decoded, store, image_root) for image in images]
                yield "batch", build(texts, images)
            positions = torch.tensor([rows.start + i for i in order], dtype=torch.int64)
            yield "shard", (shard, positions, kb_sha, features_sha)

    n_rows = sum(min(shard_size, len(reader) - s * shard_size) for s in todo)
    bar = tqdm(total=n_rows, unit="passage", desc=f"encode (rank {rank})", disable=not progress, position=rank)
    pieces: list[torch.Tensor] = []
    for kind, item in prefetch(work(), depth=prefetch_batches):
        if kind == "batch":
            pieces.append(forward_batch(model, item, autocast_dtype, device))
            bar.update(pieces[-1].shape[0])
            continue
        shard, positions, kb_sha, features_sha = item
        embeddings = torch.cat(pieces) if pieces else torch.empty(0, 0)
        pieces = []
        write_shard(
            output_dir,
            shard,
            embeddings.to(STORAGE_DTYPES[storage_dtype]),
            positions,
            plan_hash,
            model_hash,
            extra={"kb_sha256": kb_sha, "features_sha256": features_sha or ""},
        )
    bar.close()
    if state is not None:
        state.wait_for_everyone()
    if not is_main:
        return None
    ids = (kb.ids_in(start, start + READ_ROWS) for start in range(0, len(kb), READ_ROWS))  # streamed
    return _finalize(output_dir, plan, ids, model, model_name, n_shards, store_path, n_store_keys)


def _decoded_image(image: Any, decoded: dict, store: Any, image_root: str | None) -> Any:
    """The decoded PIL image of a file reference (decoded once per shard, `decoded` keyed by reference); any other
    reference (store key, feature file, bytes, arrays, None) is returned as is, for the batch builder."""
    key = image if isinstance(image, str) else _cell_path(image)
    if key is None:
        return image
    if key not in decoded:
        if classify(image, store, image_root) == IMAGE_FILE:
            decoded[key] = resolve_visual(image, store, image_root)[1]
        else:
            decoded[key] = None
    return decoded[key] if decoded[key] is not None else image


def _length_order(texts: list[str]) -> list[int]:
    """Rows of a shard, longest text first; equal lengths keep their KB order (a stable sort)."""
    return sorted(range(len(texts)), key=lambda i: -len(texts[i]))


def _cell_path(image: Any) -> tuple | None:
    """A hashable key for an undecoded image cell that points to a file (None otherwise)."""
    if isinstance(image, dict) and not image.get("bytes") and image.get("path"):
        return ("cell", image["path"])
    return None


def check_kb_images(
    reader: KBReader, store: Any, image_root: str | None, require_match: bool = False, progress: bool = False
) -> int:
    """
    One streamed pass over the image column (no pass when the KB has none): references that resolve to neither a
    store key nor a file are refused before anything is written; a feature store that no cell references is an error
    (with `require_match`), one that only some reference is reported. A distinct reference is classified once per
    range (an article's passages, contiguous in the KB, share its image). Returns the number of distinct store keys
    referenced.
    """
    from tqdm.auto import tqdm

    if not reader.has_images:
        if store is not None and require_match:
            raise ValueError(
                f"a feature store ({getattr(store, 'path', None)!r}) was given but the KB has no image cells (column "
                f"{reader.kb.mapping.passage_image!r} is absent or empty): drop --feature_store, or map the image "
                f"column with --image_column"
            )
        return 0
    bad_ids, bad_images, keys = [], [], set()
    counts = {STORE_KEY: 0, NONE: 0, "other": 0}
    bar = tqdm(total=len(reader), unit="passage", desc="check image references", disable=not progress)
    for rows in reader.ranges(with_texts=False):
        kinds: dict[Any, str] = {}
        for passage_id, image in zip(rows.ids, rows.images):
            key = image if isinstance(image, str) else _cell_path(image)
            kind = kinds.get(key) if key is not None else None
            if kind is None:
                kind = classify(image, store, image_root)
                if key is not None:
                    kinds[key] = kind
            if kind == STORE_KEY:
                keys.add(image)
            elif kind == MISSING:
                bad_ids.append(passage_id)
                bad_images.append(image)
            counts[kind if kind in counts else "other"] += 1
        bar.update(rows.stop - rows.start)
    bar.close()
    if bad_ids:  # the one message of data.references, over the offending rows only
        check_image_references(bad_ids, bad_images, store, image_root, what="KB passages")
    if store is None:
        return 0
    with_image = counts[STORE_KEY] + counts["other"]
    if counts[STORE_KEY] == 0:
        message = (
            f"none of the KB's {with_image} image cells is a key of the feature store {getattr(store, 'path', None)!r} "
            f"(its keys look like {[k for _, k in zip(range(3), store.keys())]}): the store would not be used. Check "
            f"that the image column holds the store's keys, or drop --feature_store"
        )
        if require_match:
            raise ValueError(message)
        logger.info(message)
    elif counts["other"]:
        logger.warning(
            f"{counts[STORE_KEY]} of the KB's {with_image} image cells are keys of the feature store; the other "
            f"{counts['other']} are read as image / feature files"
        )
    return len(keys)


def _check_or_write_plan(output_dir: str, plan: dict, is_main: bool, state: Any) -> None:
    path = os.path.join(output_dir, PLAN)
    if os.path.isfile(path):
        previous = read_json(path, "encoding plan")
        if previous.get("plan_hash") != plan["plan_hash"]:
            if previous.get("layout") != plan["layout"]:
                raise ValueError(
                    f"{output_dir!r} holds an encoding made by an earlier version of vl-joint-encoder (shards of a "
                    f"global length sort, KB fingerprint without image files): it cannot be resumed. Use a new output "
                    f"directory, or delete this one to start over"
                )
            changed = [k for k in plan if k != "plan_hash" and previous.get(k) != plan[k]]
            reasons = {
                "count": f"the KB has {plan['count']} passages, {previous.get('count')} when encoding started",
                "model_sha256": "the model weights differ from those the shards were encoded with",
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


def _shard_metadata(output_dir: str, shard: int, plan_hash: str) -> dict | None:
    """The metadata of a shard written for this plan, or None (missing, unreadable, another plan's)."""
    metadata = read_shard_metadata(os.path.join(output_dir, shard_name(shard)))
    return metadata if metadata is not None and metadata.get("plan_hash") == plan_hash else None


def _verify_complete_shard(
    output_dir: str, shard: int, metadata: dict, rows: PassageRange, store: Any, image_root: str | None
) -> bool:
    """
    True when a complete shard can be kept: its tensors match their checksums (False, with a warning, when not: it is
    re-encoded) and its rows are unchanged in today's KB (a ValueError when they changed: the KB is not the one whose
    encoding is being resumed).
    """
    path = os.path.join(output_dir, shard_name(shard))
    try:
        load_shard(path, verify=True)
    except ValueError as error:
        logger.warning(f"{error}; re-encoding shard {shard}")
        return False
    where = f"rows {rows.start}-{rows.stop - 1}"
    if metadata.get("kb_sha256") != rows_fingerprint(rows, store, image_root):
        raise ValueError(
            f"{output_dir!r}: the KB changed since encoding started ({where} of shard {shard} differ in ids, texts, "
            f"image references or image files (size / modification time)). Use a new output directory, or delete "
            f"this one to start over"
        )
    if (metadata.get("features_sha256") or None) != features_fingerprint(rows, store):
        raise ValueError(
            f"{output_dir!r}: the feature store's arrays for the KB's keys differ from those encoded ({where} of "
            f"shard {shard}). Pass the store the encoding started with, or use a new output directory"
        )
    return True


def _finalize(
    output_dir: str,
    plan: dict,
    ids: Iterable[list[str]],
    model,
    model_name: str | None,
    n_shards: int,
    store_path: str | None = None,
    n_store_keys: int = 0,
) -> dict:
    shards, kb_parts, feature_parts = [], [], []
    for shard in range(n_shards):
        name = shard_name(shard)
        metadata = _shard_metadata(output_dir, shard, plan["plan_hash"])
        if metadata is None:
            raise RuntimeError(f"shard {shard} is missing after encoding: a process failed; re-run to resume")
        path = os.path.join(output_dir, name)
        shards.append(
            {
                "file": name,
                "rows": int(metadata["rows"]),
                "sha256": metadata["sha256"],
                "bytes": os.path.getsize(path),
                # safetensors writes metadata in a random order (a hash map): the file's bytes vary, its content not
                "metadata_sha256": metadata_checksum(metadata),
            }
        )
        kb_parts.append(metadata["kb_sha256"])
        feature_parts.append(metadata.get("features_sha256") or None)
    config = model.config
    ids_path = os.path.join(output_dir, IDS)
    write_ids(ids_path, ids)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": plan["layout"],
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
        "kb_fingerprint": combine_fingerprints(plan["count"], kb_parts),
        "fingerprint_version": plan["fingerprint_version"],
        "plan_hash": plan["plan_hash"],
        "ids": {"file": IDS, "bytes": os.path.getsize(ids_path), "sha256": file_sha256(ids_path)},
        "shards": shards,
    }
    features = combine_fingerprints(plan["count"], feature_parts)
    if features is not None:
        manifest["feature_store"] = {"path": store_path, "sha256": features, "keys": n_store_keys}
    if "image_root" in plan:
        manifest["image_root"] = plan["image_root"]
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    write_json(os.path.join(output_dir, MANIFEST), manifest, indent=1)
    logger.info(f"encoded {plan['count']} passages into {n_shards} shards in {output_dir}")
    return manifest


def kb_fingerprints(
    kb: Any, shard_size: int, feature_store: Any = None, image_root: str | None = None, **columns
) -> tuple[str, str | None]:
    """(KB fingerprint, feature-store fingerprint or None) of `kb` read in shards of `shard_size` rows, as recorded in
    a manifest by `encode_knowledge_base` (one streamed pass)."""
    reader = KBReader(read_knowledge_base(kb, kb_columns(**columns)))
    store = open_feature_store(feature_store)
    kb_parts, feature_parts = [], []
    for rows in reader.ranges(shard_size):
        kb_parts.append(rows_fingerprint(rows, store, image_root))
        feature_parts.append(features_fingerprint(rows, store))
    return combine_fingerprints(len(reader), kb_parts), combine_fingerprints(len(reader), feature_parts)


def check_knowledge_base(
    output_dir: str | os.PathLike, kb: Any, feature_store: Any = None, image_root: str | None = None, **columns
) -> None:
    """
    Raise a ValueError if `kb` is not the KB encoded in `output_dir` (count or content fingerprint differ, image
    files changed) or, given `feature_store`, if its features for the KB's keys are not those encoded.
    """
    manifest = read_json(os.path.join(output_dir, MANIFEST), "embeddings manifest")
    if manifest.get("fingerprint_version") != FINGERPRINT_VERSION:
        raise ValueError(f"{output_dir} was encoded by an earlier version of vl-joint-encoder: re-encode the KB")
    shard_size = int(read_json(os.path.join(output_dir, PLAN), "encoding plan")["shard_size"])
    if image_root is None:
        image_root = manifest.get("image_root")
    kb = read_knowledge_base(kb, kb_columns(**columns))
    if len(kb) != manifest["count"]:
        raise ValueError(f"the KB has {len(kb)} passages but {output_dir} encodes {manifest['count']}: re-encode it")
    store = open_feature_store(feature_store)
    kb_sha, features_sha = kb_fingerprints(kb, shard_size, store, image_root)
    if kb_sha != manifest["kb_fingerprint"]:
        raise ValueError(
            f"the KB changed since it was encoded into {output_dir} (same count, different ids, texts, image "
            f"references or image files)"
        )
    recorded = manifest.get("feature_store", {}).get("sha256")
    if store is not None and recorded is not None and features_sha != recorded:
        raise ValueError(f"the feature store's features of the KB's keys differ from those encoded in {output_dir}")


__all__ = ["check_kb_images", "check_knowledge_base", "encode_knowledge_base", "kb_columns", "kb_fingerprints"]
