"""Feature extraction (`vl-joint-encoder extract-features`): CLIP (or SigLIP) grid + pooled features of a folder of
images or a `datasets` image column, batched, resumable, written as safetensors shards or `datasets` Arrow shards
keyed by image id. `data.feature_stores.ExtractedFeatureStore` reads the folder back.

The grid features are computed by `modeling_joint_encoder.vision_tokens`, the function the model's own tower path
calls, so `visual_feats` + `visual_pos` read back from the shards give the model the same embedding as `pixel_values`.

Layout of the output folder:
    manifest.json            extractor (checkpoint, tower class, vision config, feature options, image processor),
                             shards written so far (file, ids), skipped images with reasons, `complete`
    shard-00000.safetensors  visual_feats (N, V, C), visual_pos (N, V, 4), pooled (N, C), image_embeds (N, D) when
                             the extractor has a global image embedding; ids in the metadata
    (or shard-00000/         a `datasets.Dataset.save_to_disk` folder with columns id, visual_feats, visual_pos, pooled
                             [, image_embeds])

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
from .tables import column_values


logger = logging.get_logger(__name__)

FORMAT_VERSION = 2  # 2: `image_embeds` arrays, `tokens` and the extractor's `image_embeds` in the manifest
FEATURE_OPTIONS = ("feature_layer", "feature_select", "grid_pool_size", "box_mode", "dtype")
CLIP_RESNET_OPTIONS = ("preprocessing", "image_size")  # OpenAI CLIP ResNet towers only
TOKEN_KINDS = ("grid", "global")


class CLIPResNetPixels:
    """The image preprocessing of a `CLIPResNetVisionModel`: `clip_resnet.pixel_values_for` with the tower config's
    `preprocessing` ('vl_adapter': VL-Adapter's squash; 'clip': OpenAI's shortest edge + center crop) at its
    `resolution`, bit-exact to torchvision's PIL path. Called like a transformers image processor."""

    def __init__(self, config):
        self.mode = config.preprocessing
        self.size = config.resolution

    def __call__(self, images, return_tensors="np"):
        from ..clip_resnet import pixel_values_for

        return {"pixel_values": pixel_values_for(list(images), self.mode, self.size).numpy()}

    def to_dict(self) -> dict:
        return {"implementation": "vl_joint_encoder.clip_resnet.pixel_values_for", "mode": self.mode, "size": self.size}


def clip_resnet_backbone_name(vision_config: dict) -> str | None:
    """'RN101' etc. for an OpenAI CLIP ResNet config (by its layers and width), None if it is no preset."""
    from ..clip_resnet import CLIP_RESNET_PRESETS

    for name, preset in CLIP_RESNET_PRESETS.items():
        if list(preset["layers"]) == list(vision_config.get("layers", ())) and preset["width"] == vision_config.get(
            "width"
        ):
            return name
    return None


def _image_projection(model: str):
    """CLIP's `visual_projection` (pooler_output -> image embedding, as `CLIPModel.get_image_features`) of a CLIP
    checkpoint, or None when the checkpoint has none (a bare vision tower, SigLIP: its pooler_output is already the
    image embedding)."""
    from transformers import AutoConfig, CLIPVisionModelWithProjection

    config = AutoConfig.from_pretrained(model)
    if config.model_type not in ("clip", "clip_vision_model"):
        return None
    if config.model_type == "clip":  # the projection size is the full model's projection_dim
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
        config = vision_config
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with_projection, info = CLIPVisionModelWithProjection.from_pretrained(
            model, config=config, output_loading_info=True
        )
    finally:
        logging.set_verbosity(verbosity)
    if any(key.startswith("visual_projection") for key in info["missing_keys"]):
        return None
    return with_projection.visual_projection.eval()


def load_extractor(model: str, **options) -> tuple[torch.nn.Module, Any, dict]:
    """
    The frozen tower, its image processor (PIL backend) and a description of the extractor, from a joint encoder
    with a tower (its own feature options are used; explicit conflicting options are an error), a CLIP / SigLIP
    checkpoint (options default to last layer, patch tokens, no pooling, grid boxes, float32), or an OpenAI CLIP
    ResNet (`RN101.pt`, or a saved `CLIPResNetVisionModel` folder; `preprocessing` 'vl_adapter' / 'clip' and
    `image_size` pick the preprocessing, boxes default to zeros for 'vl_adapter' as VL-Adapter's loaders).
    The description's `image_embeds` says what the one-token global vector is (`tokens="global"`).
    """
    from transformers import AutoConfig, AutoImageProcessor

    from ..modeling_joint_encoder import JointEncoderModel
    from ..processing_joint_encoder import JointEncoderProcessor, image_processor_for_config
    from ..vision import clip_resnet_checkpoint_kind, load_clip_resnet_tower, load_vision_tower

    resnet_options = {"preprocessing": options.pop("preprocessing", None), "input_size": options.pop("image_size", None)}
    projection, embeds = None, "pooler_output"
    if clip_resnet_checkpoint_kind(model) is not None:
        tower = load_clip_resnet_tower(model, **resnet_options)
        image_processor = CLIPResNetPixels(tower.config)
        defaults = {"feature_layer": -1, "feature_select": "patch", "grid_pool_size": None,
                    "box_mode": "zeros" if tower.config.preprocessing == "vl_adapter" else "grid", "dtype": None}
        resolved = {k: (options.get(k) if options.get(k) is not None else v) for k, v in defaults.items()}
        embeds = "attention-pool output (CLIP image embedding)"
    else:
        given = {k: v for k, v in resnet_options.items() if v is not None}
        config = AutoConfig.from_pretrained(model)
        if given and not (config.model_type == "vl_joint_encoder" and config.vision_config is not None
                          and config.vision_config.model_type == "clip_resnet_vision_model"):  # fmt: skip
            raise ValueError(
                f"--preprocessing / --image_size apply to OpenAI CLIP ResNet towers; {model} is a "
                f"{config.model_type!r} checkpoint, which brings its own preprocessor_config.json"
            )
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
            if given and config.vision_config.model_type == "clip_resnet_vision_model":
                conflicts.update({
                    k: v for k, v in given.items() if v != getattr(config.vision_config, k)
                })  # fmt: skip
            if conflicts:
                raise ValueError(
                    f"{model} extracts with {from_config}; the options {conflicts} differ, and features extracted "
                    f"with them would not match what the model computes from pixels: drop them"
                )
            tower = JointEncoderModel.from_pretrained(model).vision_model
            if config.vision_config.model_type == "clip_resnet_vision_model":
                image_processor = CLIPResNetPixels(config.vision_config)
                embeds = "attention-pool output (CLIP image embedding)"
            else:
                try:
                    image_processor = JointEncoderProcessor.from_pretrained(model).image_processor
                except (OSError, ValueError):
                    image_processor = image_processor_for_config(config)
                if config.vision_config.model_type.startswith("clip"):
                    embeds = None  # the joint encoder keeps CLIP's tower, not its visual projection
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
            if config.model_type.startswith("clip"):
                projection = _image_projection(model)
                embeds = "visual_projection(pooler_output) (CLIP get_image_features)" if projection is not None else None
            else:
                embeds = "pooler_output (SigLIP get_image_features)"
    info = {
        "checkpoint": str(model),
        "tower_class": type(tower).__name__,
        "vision_config": tower.config.to_diff_dict(),
        "image_processor": image_processor.to_dict(),
        "image_embeds": embeds,
        **resolved,
    }
    if info["tower_class"] == "CLIPResNetVisionModel":
        info["vision_config"] = {**tower.config.to_dict(), "resolution": tower.config.resolution}
        info["backbone"] = clip_resnet_backbone_name(info["vision_config"])
    for key in ("_name_or_path", "transformers_version", "auto_map"):
        info["vision_config"].pop(key, None)
    info["image_processor"].pop("auto_map", None)
    if projection is not None:
        tower.image_projection = projection  # used by extract_features for `image_embeds`
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
    ids = [str(i) for i in column_values(dataset, id_column)] if id_column else [str(i) for i in range(len(dataset))]
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
    # safetensors writes the raw buffer: a strided array (a CLIP-ResNet grid is a transposed view) must be made
    # C-contiguous first, or the file holds the values in memory order, not in (N, V, C) order
    arrays = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
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
            **{name: List(Value("float32"), length=arrays[name].shape[1])
               for name in ("pooled", "image_embeds") if name in arrays},
        })  # fmt: skip
        columns = {"id": ids, **{k: list(v) for k, v in arrays.items()}}
        Dataset.from_dict(columns, features=features).save_to_disk(tmp)


@torch.no_grad()
def _image_embeds(tower: torch.nn.Module, pooled: torch.Tensor, kind: str | None) -> torch.Tensor | None:
    """The global image embedding (N, D) float32: CLIP ViT's `visual_projection(pooler_output)`, else the tower's
    pooler_output (a CLIP ResNet's attention pool, SigLIP's head), None when the extractor has none."""
    if kind is None:
        return None
    projection = getattr(tower, "image_projection", None)
    if projection is not None:
        return projection(pooled.to(projection.weight.dtype)).float()
    return pooled.float()


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
    tokens: str = "grid",
    **options,
) -> dict:
    """
    Extract grid + pooled features of `source` (an image folder or a `datasets.Dataset` with `image_column`) into
    `output_dir`; see the module docstring for the layout. Resumes a previous run into the same folder (same extractor
    required). `max_shards` stops after writing that many new shards (work in chunks); `on_error="skip"` skips
    unreadable images and lists them in the manifest. Options: feature_layer, feature_select, grid_pool_size,
    box_mode, dtype (see `JointEncoderConfig.vision_*`); for OpenAI CLIP ResNet files also preprocessing
    ('vl_adapter' / 'clip') and image_size. `tokens="grid"` writes the grid tokens as `visual_feats`;
    `tokens="global"` writes the image embedding (CLIP `get_image_features`; a ResNet's attention pool) as ONE token
    with the whole-image box (zeros with box_mode 'zeros'). Every shard also holds `pooled` (the tower's
    pooler_output) and, when the extractor has one, `image_embeds`. Returns the manifest.
    """
    from ..modeling_joint_encoder import vision_tokens

    if output_format not in ("safetensors", "arrow"):
        raise ValueError(f"output_format must be 'safetensors' or 'arrow', got {output_format!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be positive")
    unknown = set(options) - set(FEATURE_OPTIONS) - set(CLIP_RESNET_OPTIONS)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; feature options are {FEATURE_OPTIONS + CLIP_RESNET_OPTIONS}")
    if tokens not in TOKEN_KINDS:
        raise ValueError(f"tokens must be one of {TOKEN_KINDS}, got {tokens!r}")
    items = _folder_items(source) if isinstance(source, (str, os.PathLike)) else _dataset_items(
        source, image_column, id_column
    )
    tower, image_processor, extractor = load_extractor(model, **options)
    if tokens == "global" and extractor["image_embeds"] is None:
        raise ValueError(
            f"{model} gives no image embedding (a CLIP vision tower without CLIP's visual_projection): give the full "
            f"CLIP checkpoint (CLIPModel), or use tokens='grid'"
        )
    extractor = {**extractor, "tokens": tokens}
    tokens_kind = tokens
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
        ids, failures, feats, pooled, embeds, boxes = [], [], [], [], [], None
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
            grid_tokens, boxes, pooled_batch = vision_tokens(
                tower, pixel_values, extractor["feature_layer"], extractor["feature_select"],
                extractor["grid_pool_size"], extractor["box_mode"], extractor["dtype"], return_pooled=True,
            )  # (n, V, C), (V, 4), (n, C)
            ids += batch_ids
            image_embeds = _image_embeds(tower, pooled_batch, extractor["image_embeds"])  # (n, D) or None
            if tokens_kind == "global":
                grid_tokens = image_embeds[:, None, :]  # (n, 1, D): one visual token
                boxes = torch.zeros(1, 4) if extractor["box_mode"] == "zeros" else torch.tensor([[0.0, 0.0, 1.0, 1.0]])
            feats.append(grid_tokens.cpu().numpy())
            pooled.append(pooled_batch.cpu().numpy())
            if image_embeds is not None:
                embeds.append(image_embeds.cpu().numpy())
        if ids:
            grid = np.concatenate(feats)  # (N, V, C)
            arrays = {
                "visual_feats": grid,
                "visual_pos": np.broadcast_to(boxes.cpu().numpy(), (len(ids), *boxes.shape)).copy(),  # (N, V, 4)
                "pooled": np.concatenate(pooled),  # (N, C)
            }
            if embeds:
                arrays["image_embeds"] = np.concatenate(embeds)  # (N, D)
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


__all__ = [
    "CLIP_RESNET_OPTIONS",
    "FEATURE_OPTIONS",
    "TOKEN_KINDS",
    "CLIPResNetPixels",
    "clip_resnet_backbone_name",
    "extract_features",
    "load_extractor",
]
