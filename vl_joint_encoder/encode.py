"""Encode a knowledge base into embedding shards: `vl-joint-encoder encode` and `encode_knowledge_base`.

- Passages are ordered by text length (longest first) so that a batch holds passages of similar length (less padding,
  as Tevatron / DPR encoders do); each shard records the KB rows it holds, so search reports KB ids and positions.
- A shard is a fixed set of rows encoded in fixed batches, whichever process encodes it: 1 or N processes
  (`accelerate launch ... -m vl_joint_encoder.encode ...`, each rank takes shards rank, rank + N, ...) and a resumed
  run give the same embeddings as one uninterrupted process.
- Resumable: shards are written atomically; a re-run with the same arguments skips the complete ones and checks that
  the model and the KB did not change (plan.json). See `embedding_store` for the format.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from transformers.utils import logging

from .collator import JointEncoderInputBuilder
from .embedding_store import (
    FORMAT,
    FORMAT_VERSION,
    IDS,
    MANIFEST,
    PLAN,
    atomic_write_json,
    read_json,
    read_shard_metadata,
    shard_name,
    write_shard,
)
from .visual_references import (
    check_image_references,
    feature_store_fingerprint,
    open_feature_store,
    referenced_store_keys,
)


logger = logging.get_logger(__name__)

AUTOCAST_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ fingerprints
def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the weights (names, dtypes, shapes, bytes) and of the retrieval-relevant config: identifies a model."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    for field in ("similarity", "normalize", "pooling", "projection_dim"):
        digest.update(f"{field}={getattr(config, field, None)};".encode())
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _image_reference(image: Any) -> str:
    """A stable string for an image cell (path, datasets {'bytes','path'}, PIL image) for the KB fingerprint."""
    if image is None:
        return ""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, dict):
        if image.get("bytes"):
            return hashlib.sha256(image["bytes"]).hexdigest()
        return str(image.get("path") or "")
    if hasattr(image, "tobytes"):
        return hashlib.sha256(image.tobytes()).hexdigest()
    return repr(image)


def kb_fingerprint(ids: Sequence[str], texts: Sequence[str], images: Sequence[Any] | None) -> str:
    """sha256 over every (id, text, image reference): detects a KB changed since it was encoded."""
    digest = hashlib.sha256(f"{len(ids)};".encode())
    for row, (passage_id, text) in enumerate(zip(ids, texts)):
        digest.update(f"{len(passage_id)}:{passage_id}{len(text)}:{text}".encode())
        if images is not None:
            digest.update(_image_reference(images[row]).encode() + b"\0")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ KB
def read_knowledge_base(
    kb: Any, id_column: str = "id", text_column: str = "text", image_column: str | None = "image"
) -> tuple[list[str], list[str], list[Any] | None]:
    """(ids, texts, images or None) from a datasets.Dataset / JSONL / Parquet / list of dicts, validated."""
    from .data import _lazy_images, load_table

    table = _lazy_images(load_table(kb, name="the KB"), image_column)
    if len(table) == 0:
        raise ValueError("the KB is empty: nothing to encode (check the file / split you passed)")
    missing = [c for c in (id_column, text_column) if c not in table.column_names]
    if missing:
        raise ValueError(
            f"the KB lacks column(s) {missing}; it has {table.column_names} (use --id_column/--text_column)"
        )
    ids = [str(i) for i in table[id_column]]
    seen: set[str] = set()
    duplicates = sorted({i for i in ids if i in seen or seen.add(i)})
    if duplicates:
        shown = ", ".join(repr(d) for d in duplicates[:5])
        raise ValueError(
            f"the KB has {len(duplicates)} duplicate passage ids, e.g. {shown}: every passage needs a unique id"
        )
    texts = table[text_column]
    bad = [ids[r] for r, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"passages {bad[:5]} have no text (column {text_column!r} must hold strings)")
    images = None
    if image_column is not None and image_column in table.column_names:
        images = table[image_column]
        if all(image is None for image in images):
            images = None
    return ids, texts, images


# ------------------------------------------------------------------------------------------------ batches
def make_batch(
    processor: Any,
    texts: list[str],
    images: list[Any] | None,
    max_length: int,
    feature_store: Mapping[str, Any] | None = None,
    image_root: str | None = None,
    feat_dim: int | None = None,
) -> dict:
    """
    Model inputs for one batch of passages or queries, built by the training collator's code
    (`collator.JointEncoderInputBuilder`): a tokenizer for text, a JointEncoderProcessor for image files / PIL images,
    padded precomputed features for keys of `feature_store` (a loaded mapping, see `data.load_feature_store`).
    """
    return JointEncoderInputBuilder(processor, max_length, feature_store, image_root, feat_dim)(texts, images)


@torch.no_grad()
def embed_batches(
    model: torch.nn.Module,
    processor: Any,
    texts: Sequence[str],
    images: Sequence[Any] | None = None,
    batch_size: int = 64,
    max_length: int = 256,
    autocast_dtype: str = "float32",
    device: torch.device | str | None = None,
    normalize: bool | None = None,
    feature_store: Any = None,
    image_root: str | None = None,
) -> torch.Tensor:
    """
    (len(texts), D) float32 embeddings, `model.encode` on fixed consecutive batches (same batches -> same bits).
    `images`: one reference per text (file path relative to `image_root`, PIL image, `datasets.Image` cell, key of
    `feature_store` (path or loaded mapping), or None).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = AUTOCAST_DTYPES[autocast_dtype]
    store, _ = open_feature_store(feature_store)
    feat_dim = getattr(getattr(model, "config", None), "feat_dim", None)
    build = JointEncoderInputBuilder(processor, max_length, store, image_root, feat_dim)
    out = []
    for start in range(0, len(texts), batch_size):
        batch = build(
            list(texts[start : start + batch_size]),
            None if images is None else list(images[start : start + batch_size]),
        )
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        context = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
        with context:
            embeddings = model.encode(normalize=normalize, **batch)  # (b, D)
        out.append(embeddings.float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


# ------------------------------------------------------------------------------------------------ the job
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
    `feature_store` (precomputed visual features: a `.npz` / `.safetensors` path, an extract-features output folder,
    or a loaded mapping; see `visual_references.open_feature_store`). Every reference is checked before encoding starts; the plan records a hash of the referenced
    features (and `image_root`), so that an encoding is not resumed over a changed store.

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
    ids, texts, images = read_knowledge_base(kb, id_column, text_column, image_column)
    store, store_path = open_feature_store(feature_store)
    check_image_references(ids, images, store, store_path, image_root, what="KB passages")
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
        previous = read_json(path)
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
        atomic_write_json(path, plan)
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
    atomic_write_json(os.path.join(output_dir, IDS), ids)
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
    atomic_write_json(os.path.join(output_dir, MANIFEST), manifest)
    logger.info(f"encoded {plan['count']} passages into {n_shards} shards in {output_dir}")
    return manifest


def check_knowledge_base(output_dir: str | os.PathLike, kb: Any, feature_store: Any = None, **columns) -> None:
    """
    Raise a ValueError if `kb` is not the KB encoded in `output_dir` (count or content fingerprint differ) or, given
    `feature_store`, if its features for the KB's keys are not those encoded.
    """
    manifest = read_json(os.path.join(output_dir, MANIFEST))
    ids, texts, images = read_knowledge_base(kb, **columns)
    if len(ids) != manifest["count"]:
        raise ValueError(f"the KB has {len(ids)} passages but {output_dir} encodes {manifest['count']}: re-encode it")
    if kb_fingerprint(ids, texts, images) != manifest["kb_fingerprint"]:
        raise ValueError(f"the KB changed since it was encoded into {output_dir} (same count, different content)")
    store, _ = open_feature_store(feature_store)
    recorded = manifest.get("feature_store", {}).get("sha256")
    if store is not None and recorded is not None:
        if feature_store_fingerprint(store, referenced_store_keys(images, store)) != recorded:
            raise ValueError(f"the feature store's features of the KB's keys differ from those encoded in {output_dir}")


# ------------------------------------------------------------------------------------------------ loading models
def load_encoder(path: str, tower: str = "passage_encoder", processor_path: str | None = None):
    """(model, processor or tokenizer) from a saved JointEncoderModel or bi-encoder folder (`tower` of it)."""
    from transformers import AutoModel, AutoTokenizer

    import vl_joint_encoder  # noqa: F401 - registers the Auto classes

    from .bi_encoder import is_bi_encoder_dir

    model_path = os.path.join(path, tower) if is_bi_encoder_dir(path) else path
    model = AutoModel.from_pretrained(model_path)
    candidates = [processor_path] if processor_path else [path, model_path]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "processor_config.json")):
            from .processing_joint_encoder import JointEncoderProcessor

            return model, JointEncoderProcessor.from_pretrained(candidate)
        if os.path.isfile(os.path.join(candidate, "tokenizer_config.json")):
            return model, AutoTokenizer.from_pretrained(candidate)
    raise ValueError(
        f"no tokenizer or processor found in {candidates}: save one next to the model or pass --processor"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vl-joint-encoder encode",
        description="Encode a knowledge base into embedding shards (resumable; several processes with accelerate launch).",
    )
    parser.add_argument("--model", required=True, help="saved JointEncoderModel or bi-encoder folder")
    parser.add_argument(
        "--kb", required=True, help="KB: JSONL / Parquet file(s) or save_to_disk folder (id, text, image)"
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--processor", help="tokenizer / processor folder (default: the model folder)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--shard_size", type=int, default=10_000)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--no_sort_by_length", action="store_true")
    parser.add_argument(
        "--autocast_dtype",
        choices=list(AUTOCAST_DTYPES),
        default="float32",
        help="autocast on GPU (float16 / bfloat16)",
    )
    parser.add_argument("--storage_dtype", choices=list(STORAGE_DTYPES), default="float32")
    parser.add_argument("--id_column", default="id")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--image_column", default="image")
    parser.add_argument(
        "--feature_store",
        help="precomputed visual features (.npz / .safetensors, or an extract-features folder); image cells that "
        "are its keys use them",
    )
    parser.add_argument("--image_root", help="folder that relative image paths are relative to")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    from vl_joint_encoder.cli import accept_both_spellings

    args = accept_both_spellings(parser).parse_args(argv)
    try:
        from accelerate import PartialState

        state = PartialState(cpu=args.cpu)
        model, processor = load_encoder(args.model, processor_path=args.processor)
        model.to(state.device)
        manifest = encode_knowledge_base(
            model,
            processor,
            args.kb,
            args.output_dir,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            max_length=args.max_length,
            sort_by_length=not args.no_sort_by_length,
            autocast_dtype=args.autocast_dtype,
            storage_dtype=args.storage_dtype,
            id_column=args.id_column,
            text_column=args.text_column,
            image_column=args.image_column,
            model_name=args.model,
            state=state,
            feature_store=args.feature_store,
            image_root=args.image_root,
        )
    except (ValueError, OSError) as error:
        print(f"vl-joint-encoder encode: error: {error}", file=sys.stderr)
        return 2
    if manifest is not None:
        print(
            f"encoded {manifest['count']} passages ({manifest['dim']}-d, {manifest['similarity']}) into {args.output_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
