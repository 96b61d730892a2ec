"""Feature extraction (`vl-joint-encoder extract-features`): CLIP (or SigLIP) grid + pooled features of a folder of
images or a `datasets` image column, batched, resumable, written as safetensors shards or `datasets` Arrow shards
keyed by image id. `data.feature_stores.ExtractedFeatureStore` reads the folder back.

The grid features are computed by `modeling_joint_encoder.vision_tokens`, the function the model's own tower path
calls, so `visual_feats` + `visual_pos` read back from the shards give the model the same embedding as `pixel_values`.

Layout of the output folder:
    manifest.json            extractor (checkpoint, tower class, vision config, feature options, image processor),
                             shards written so far (file, ids), skipped images with reasons, `complete`
    shard-00000.safetensors  visual_feats (N, V, C), visual_pos (N, V, 4), pooled (N, C); ids in the metadata
    (or shard-00000/         a `datasets.Dataset.save_to_disk` folder with columns id, visual_feats, visual_pos, pooled)

Shard k always holds the images k*shard_size .. (k+1)*shard_size-1 of the sorted input (bad images skipped), and is
written to a temporary name then renamed, so an interrupted run resumes where it stopped and gives the same files as
an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..images import DEFAULT_MAX_PIXELS, ImageLoadError, list_image_files, load_image
from ..utils.io import atomic_path, read_json, write_json
from .feature_stores import EXTRACTION_MANIFEST


logger = logging.get_logger(__name__)

FORMAT_VERSION = 1
FEATURE_OPTIONS = ("feature_layer", "feature_select", "grid_pool_size", "box_mode", "dtype")


def load_extractor(model: str, **options) -> tuple[torch.nn.Module, Any, dict]:
    """
    The frozen tower, its image processor (PIL backend) and a description of the extractor, from a joint encoder
    with a tower (its own feature options are used; explicit conflicting options are an error) or a CLIP / SigLIP
    checkpoint (options default to last layer, patch tokens, no pooling, grid boxes, float32).
    """
    from transformers import AutoConfig, AutoImageProcessor

    from ..modeling_joint_encoder import JointEncoderModel
    from ..processing_joint_encoder import JointEncoderProcessor, image_processor_for_config
    from ..vision import load_vision_tower

    config = AutoConfig.from_pretrained(model)
    if config.model_type == "vl_joint_encoder":
        if config.vision_config is None:
            raise ValueError(f"{model} is a joint encoder without a vision tower: give a CLIP checkpoint instead")
        from_config = {
            "feature_layer": config.vision_feature_layer,
            "feature_select": config.vision_feature_select,
            "grid_pool_size": config.vision_grid_pool_size,
            "box_mode": config.vision_box_mode,
            "dtype": config.vision_tower_dtype,
        }
        conflicts = {k: v for k, v in options.items() if v is not None and v != from_config[k]}
        if conflicts:
            raise ValueError(
                f"{model} extracts with {from_config}; the options {conflicts} differ, and features extracted with "
                f"them would not match what the model computes from pixels: drop them"
            )
        tower = JointEncoderModel.from_pretrained(model).vision_model
        try:
            image_processor = JointEncoderProcessor.from_pretrained(model).image_processor
        except (OSError, ValueError):
            image_processor = image_processor_for_config(config)
        resolved = from_config
    else:
        tower = load_vision_tower(model)
        try:
            image_processor = AutoImageProcessor.from_pretrained(model, backend="pil")
        except OSError:
            raise ValueError(f"{model} has no preprocessor_config.json: the image preprocessing is unknown") from None
        defaults = {"feature_layer": -1, "feature_select": "patch", "grid_pool_size": None, "box_mode": "grid",
                    "dtype": None}
        resolved = {k: (options.get(k) if options.get(k) is not None else v) for k, v in defaults.items()}
    info = {
        "checkpoint": str(model),
        "tower_class": type(tower).__name__,
        "vision_config": tower.config.to_diff_dict(),
        "image_processor": image_processor.to_dict(),
        **resolved,
    }
    for key in ("_name_or_path", "transformers_version"):
        info["vision_config"].pop(key, None)
    info["image_processor"].pop("auto_map", None)
    return tower.eval(), image_processor, info


def _folder_items(folder: str) -> list[tuple[str, Any]]:
    files = list_image_files(folder)
    if not files:
        raise ValueError(f"no image file found under {folder!r}")
    items, seen = [], {}
    for path in files:
        image_id = os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "/")
        if image_id in seen:
            raise ValueError(f"{seen[image_id]!r} and {path!r} give the same image id {image_id!r}: rename one")
        seen[image_id] = path
        items.append((image_id, path))
    return items


def _dataset_items(dataset, image_column: str, id_column: str | None) -> list[tuple[str, Any]]:
    if image_column not in dataset.column_names:
        raise ValueError(f"the dataset has no column {image_column!r} (columns: {dataset.column_names})")
    if id_column is not None and id_column not in dataset.column_names:
        raise ValueError(f"the dataset has no id column {id_column!r} (columns: {dataset.column_names})")
    ids = [str(i) for i in dataset[id_column]] if id_column else [str(i) for i in range(len(dataset))]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the id column {id_column!r} has duplicate ids: image ids must be unique")
    return [(image_id, (dataset, row, image_column)) for row, image_id in enumerate(ids)]


def _open(source: Any, max_pixels: int | None):
    if isinstance(source, tuple):  # (dataset, row, column): decode lazily, one row at a time
        dataset, row, column = source
        source = dataset[row][column]
        if isinstance(source, dict):
            source = source.get("bytes") or source.get("path")
    return load_image(source, max_pixels=max_pixels)


def _write_shard(output_dir: str, name: str, output_format: str, ids: list[str], arrays: dict[str, np.ndarray]):
    with atomic_path(os.path.join(output_dir, name)) as tmp:
        _write_shard_to(tmp, output_format, ids, arrays)


def _write_shard_to(tmp: str, output_format: str, ids: list[str], arrays: dict[str, np.ndarray]) -> None:
    if output_format == "safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, tmp, metadata={"ids": json.dumps(ids)})
    else:
        from datasets import Array2D, Dataset, Features, List, Value

        num_tokens, dim = arrays["visual_feats"].shape[1:]
        features = Features({
            "id": Value("string"),
            "visual_feats": Array2D((num_tokens, dim), "float32"),
            "visual_pos": Array2D((num_tokens, 4), "float32"),
            "pooled": List(Value("float32"), length=arrays["pooled"].shape[1]),
        })
        columns = {"id": ids, **{k: list(v) for k, v in arrays.items()}}
        Dataset.from_dict(columns, features=features).save_to_disk(tmp)


def extract_features(
    source: str | Any,
    output_dir: str,
    model: str,
    image_column: str = "image",
    id_column: str | None = None,
    batch_size: int = 16,
    shard_size: int = 512,
    output_format: str = "safetensors",
    on_error: str = "raise",
    device: str = "cpu",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_shards: int | None = None,
    overwrite: bool = False,
    **options,
) -> dict:
    """
    Extract grid + pooled features of `source` (an image folder or a `datasets.Dataset` with `image_column`) into
    `output_dir`; see the module docstring for the layout. Resumes a previous run into the same folder (same extractor
    required). `max_shards` stops after writing that many new shards (work in chunks); `on_error="skip"` skips
    unreadable images and lists them in the manifest. Options: feature_layer, feature_select, grid_pool_size,
    box_mode, dtype (see `JointEncoderConfig.vision_*`). Returns the manifest.
    """
    from ..modeling_joint_encoder import vision_tokens

    if output_format not in ("safetensors", "arrow"):
        raise ValueError(f"output_format must be 'safetensors' or 'arrow', got {output_format!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be positive")
    unknown = set(options) - set(FEATURE_OPTIONS)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; feature options are {FEATURE_OPTIONS}")
    items = _folder_items(source) if isinstance(source, (str, os.PathLike)) else _dataset_items(
        source, image_column, id_column
    )
    tower, image_processor, extractor = load_extractor(model, **options)
    tower.to(device)
    manifest_path = os.path.join(output_dir, EXTRACTION_MANIFEST)
    settings = {"extractor": extractor, "format": output_format, "shard_size": shard_size,
                "num_images": len(items), "format_version": FORMAT_VERSION}
    if os.path.exists(manifest_path) and overwrite:
        shutil.rmtree(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    if os.path.exists(manifest_path):
        manifest = read_json(manifest_path, "extract-features manifest")
        previous = {k: manifest.get(k) for k in settings}
        if json.loads(json.dumps(settings)) != previous:
            changed = sorted(k for k in settings if json.loads(json.dumps(settings[k])) != previous[k])
            raise ValueError(
                f"{output_dir} holds features of another extraction (differs in {changed}): use another output "
                f"folder, or overwrite=True (--overwrite) to start again"
            )
    else:
        manifest = {**settings, "shards": [], "failures": [], "complete": False}
        write_json(manifest_path, manifest, sort_keys=True)

    done = {shard["index"] for shard in manifest["shards"]
            if shard["file"] is None or os.path.exists(os.path.join(output_dir, shard["file"]))}
    manifest["shards"] = [shard for shard in manifest["shards"] if shard["index"] in done]
    num_shards = (len(items) + shard_size - 1) // shard_size
    written = 0
    extension = ".safetensors" if output_format == "safetensors" else ""
    progress = tqdm(total=len(items), desc="extract-features", unit="img")
    for k in range(num_shards):
        shard_items = items[k * shard_size:(k + 1) * shard_size]
        name = f"shard-{k:05d}{extension}"
        if k in done:
            progress.update(len(shard_items))
            continue
        if max_shards is not None and written >= max_shards:
            break
        ids, failures, feats, pooled, boxes = [], [], [], [], None
        for start in range(0, len(shard_items), batch_size):
            batch_ids, images = [], []
            for image_id, item in shard_items[start:start + batch_size]:
                try:
                    images.append(_open(item, max_pixels))
                    batch_ids.append(image_id)
                except ImageLoadError as error:
                    if on_error == "raise":
                        raise
                    failures.append({"id": image_id, "reason": str(error)})
            progress.update(len(shard_items[start:start + batch_size]))
            if not images:
                continue
            pixel_values = torch.from_numpy(
                np.asarray(image_processor(images=images, return_tensors="np")["pixel_values"], dtype=np.float32)
            ).to(device)  # (n, 3, H, W)
            tokens, boxes, pooled_batch = vision_tokens(
                tower, pixel_values, extractor["feature_layer"], extractor["feature_select"],
                extractor["grid_pool_size"], extractor["box_mode"], extractor["dtype"], return_pooled=True,
            )  # (n, V, C), (V, 4), (n, C)
            ids += batch_ids
            feats.append(tokens.cpu().numpy())
            pooled.append(pooled_batch.cpu().numpy())
        if ids:
            grid = np.concatenate(feats)  # (N, V, C)
            arrays = {
                "visual_feats": grid,
                "visual_pos": np.broadcast_to(boxes.cpu().numpy(), (len(ids), *boxes.shape)).copy(),  # (N, V, 4)
                "pooled": np.concatenate(pooled),  # (N, C)
            }
            _write_shard(output_dir, name, output_format, ids, arrays)
        manifest["shards"].append({"file": name if ids else None, "index": k, "ids": ids})
        manifest["failures"] += failures
        write_json(manifest_path, manifest, sort_keys=True)
        written += 1
    progress.close()
    manifest["shards"] = sorted(manifest["shards"], key=lambda shard: shard["index"])
    manifest["complete"] = len({shard["index"] for shard in manifest["shards"]}) == num_shards
    write_json(manifest_path, manifest, sort_keys=True)
    if manifest["failures"]:
        logger.warning("%d image(s) skipped, listed in %s", len(manifest["failures"]), manifest_path)
    return manifest


__all__ = ["FEATURE_OPTIONS", "extract_features", "load_extractor"]
