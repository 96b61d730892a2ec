"""Feature stores: precomputed visual features by key, one protocol and one opener for every layout.

A feature store maps an image key (the `image` cell of a query or passage) to its features:
`store[key] -> {"visual_feats": (V, C) float32, "visual_pos": (V, 4) in [0, 1] or None, ...}`, with `key in store`,
`store.keys()`, `len(store)` and `store.path` (where it was read from, or None). `open_feature_store` accepts:

- a `.npz` / `.safetensors` file: key `NAME` -> features (V, C), optional key `NAME.visual_pos` -> boxes (V, 4);
- a `vl-joint-encoder extract-features` output folder (`manifest.json` + shards; written by `data.extraction`);
- the layouts the original projects write, read as their loaders read them (docs/visual_features.md):
  - VL-T5 / LXMERT Faster R-CNN HDF5 (`train2014_obj36.h5`: a group per image id with `features` (36, 2048),
    `boxes` in pixels, `img_h`, `img_w`): exactly `n_boxes` (36) features, boxes divided by the image size and checked
    against the original tolerance (`FasterRCNNFeatures`, j-min/VL-T5 `src/vqa_data.py` 145-171);
  - LXMERT's TSV (`val2014_obj36.tsv`), read through the layout the originals' `tsv_to_h5.py` converts it to, so
    the same as that HDF5 file (`LXMERTTSVFeatures`; `tsv_to_h5` writes the file itself);
  - VL-Adapter's CLIP grids: a folder of one file per image (`data_clip_RN101_att/{img_id}.h5`, group `img_id`,
    dataset `features` (49, 2048) float16; `PerImageCLIPFeatures`, ylsung/VL_adapter `feature_extraction/coco_CLIP.py`
    and `VL-T5/src/vqa_clip_data.py` 159-191), or one file with a group per image (`CLIPGridFeatures`); zero boxes;
- a store already opened, or any mapping key -> array (V, C) or -> dict as above.

A single image may also point to its own feature file (`.npy` / `.npz` / `.safetensors`), read by
`load_feature_file`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from transformers.utils import logging

from ..processing_joint_encoder import BOX_TOLERANCE
from ..utils.io import read_json
from .original_features import (
    HDF5_SUFFIXES,
    N_BOXES,
    TSV_SUFFIXES,
    CLIPGridFeatures,
    FasterRCNNFeatures,
    LXMERTTSVFeatures,
    PerImageCLIPFeatures,
    clip_grid_entry,
    faster_rcnn_entry,
    open_feature_file,
    tsv_to_h5,
)


logger = logging.get_logger(__name__)

FEATURE_FILE_SUFFIXES = (".npy", ".npz", ".safetensors")
# the extract-features folder layout (written by data.extraction, read by ExtractedFeatureStore)
EXTRACTION_MANIFEST = "manifest.json"
EXTRACTED_ARRAYS = ("visual_feats", "visual_pos", "pooled")
OPTIONAL_EXTRACTED_ARRAYS = ("image_embeds",)  # the global image embedding, when the extractor has one


@runtime_checkable
class FeatureStore(Protocol):
    """What every feature store offers (see the module docstring)."""

    path: str | None

    def __contains__(self, key: object) -> bool: ...

    def __getitem__(self, key: str) -> dict[str, np.ndarray | None]: ...

    def __len__(self) -> int: ...

    def keys(self) -> Sequence[str]: ...


def describe_store(store: FeatureStore | None) -> str:
    path = getattr(store, "path", None)
    return f"the feature store {path!r}" if path else "the feature store (given in memory)"


def as_entry(value: Any) -> dict[str, np.ndarray | None]:
    """A store value (an array, or a dict with `visual_feats` [+ `visual_pos`, ...]) as a dict of arrays."""
    if isinstance(value, Mapping):
        entry = dict(value)
        entry["visual_feats"] = np.asarray(entry["visual_feats"])
        entry.setdefault("visual_pos", None)
        return entry
    return {"visual_feats": np.asarray(value), "visual_pos": None}


class MappingFeatureStore:
    """A store over an in-memory mapping key -> features (array (V, C) or dict); `path` says where it came from."""

    def __init__(self, entries: Mapping[str, Any], path: str | None = None):
        self._entries = entries
        self.path = path

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __getitem__(self, key: str) -> dict[str, np.ndarray | None]:
        return as_entry(self._entries[key])

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        return list(self._entries.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


def read_array_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of a `.npz` (no pickles) or `.safetensors` file."""
    path = os.fspath(path)
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            return load_file(path)
        if path.endswith(".npy"):
            return {"visual_feats": np.load(path, allow_pickle=False)}
    except (OSError, ValueError) as error:
        raise ValueError(f"feature file {path!r} is not a readable {os.path.splitext(path)[1]} file ({error})") from None
    raise ValueError(f"feature file {path!r}: give a .npy, .npz or .safetensors file")


def load_array_store(path: str | os.PathLike) -> MappingFeatureStore:
    """A `.npz` / `.safetensors` store: key `NAME` -> features, optional `NAME.visual_pos` -> boxes."""
    path = os.path.abspath(os.fspath(path))
    arrays = read_array_file(path)
    entries = {
        key: {"visual_feats": value, "visual_pos": arrays.get(f"{key}.visual_pos")}
        for key, value in arrays.items()
        if not key.endswith(".visual_pos")
    }
    logger.info(f"feature store {path}: {len(entries)} keys")
    return MappingFeatureStore(entries, path)


def load_feature_file(path: str | os.PathLike) -> dict[str, np.ndarray | None]:
    """The features of ONE image stored in their own file: `.npy` (features), or `.npz` / `.safetensors` with
    `visual_feats` and optional `visual_pos`."""
    arrays = read_array_file(path)
    if "visual_feats" not in arrays:
        raise ValueError(f"feature file {os.fspath(path)!r} has no 'visual_feats' array (it has {sorted(arrays)})")
    return {"visual_feats": arrays["visual_feats"], "visual_pos": arrays.get("visual_pos")}


# ------------------------------------------------------------------------------------------------ extract-features
class ExtractedFeatureStore:
    """An `extract-features` output folder: `store[image_id]` -> visual_feats (V, C), visual_pos (V, 4), pooled (C,)
    [, image_embeds (D,)]. Shards are read on first use and kept."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(output_dir))
        manifest_path = os.path.join(self.path, EXTRACTION_MANIFEST)
        if not os.path.isfile(manifest_path):
            raise ValueError(f"{self.path} has no {EXTRACTION_MANIFEST}: not an extract-features output folder")
        self.manifest = read_json(manifest_path, "extract-features manifest")
        if not isinstance(self.manifest, dict) or "shards" not in self.manifest or "format" not in self.manifest:
            raise ValueError(
                f"{manifest_path} is not an extract-features manifest (written by another tool?): give the folder "
                f"`vl-joint-encoder extract-features --output` wrote"
            )
        if not self.manifest.get("complete"):
            logger.warning("%s: the extraction is not complete (resume it to add the missing shards)", self.path)
        self.index = {
            image_id: (shard["file"], row)
            for shard in self.manifest["shards"]
            if shard["file"]
            for row, image_id in enumerate(shard["ids"])
        }
        self._open: dict[str, Any] = {}

    @property
    def output_dir(self) -> str:
        return self.path

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.index

    def keys(self) -> list[str]:
        return list(self.index)

    def __getitem__(self, image_id: str) -> dict[str, np.ndarray]:
        if image_id not in self.index:
            raise KeyError(f"image id {image_id!r} is not in {self.path} ({len(self)} images)")
        name, row = self.index[image_id]
        if name not in self._open:
            shard_path = os.path.join(self.path, name)
            if self.manifest["format"] == "safetensors":
                from safetensors.numpy import load_file

                self._open[name] = load_file(shard_path)
            else:
                from datasets import load_from_disk

                self._open[name] = load_from_disk(shard_path).with_format("numpy")
        shard = self._open[name]
        if self.manifest["format"] == "safetensors":
            return {key: shard[key][row] for key in EXTRACTED_ARRAYS + OPTIONAL_EXTRACTED_ARRAYS if key in shard}
        record = shard[row]
        return {key: np.asarray(record[key], dtype=np.float32) for key in EXTRACTED_ARRAYS + OPTIONAL_EXTRACTED_ARRAYS
                if key in record}  # fmt: skip


# ------------------------------------------------------------------------------------------------ expected features
# A converted checkpoint's config carries `visual_features` (written by the converter, conversion/), the features it
# was trained on: {"kind": "clip_grid" | "faster_rcnn" | "global", "backbone": "RN101" | ..., "layer", "grid",
# "num_tokens", "feat_dim", "boxes": True (real boxes needed) / False, "preprocessing", "description", "extract":
# the command that makes them}. `check_visual_features` refuses features that do not fit, where a store is joined
# to the model (data.inputs.JointEncoderInputBuilder); forward only sees tensors.
VISUAL_FEATURE_KINDS = ("clip_grid", "faster_rcnn", "global")
_CLIP_FOLDER = re.compile(r"data_clip_(?P<backbone>[A-Za-z0-9x]+)_(?:att|fc)$")


def store_feature_description(store: FeatureStore | None) -> dict:
    """What a store says about its features, as far as it knows: kind ('clip_grid', 'faster_rcnn', 'global'),
    backbone ('RN101', ...), preprocessing. Empty for in-memory stores and plain array files."""
    if store is None:
        return {}
    if isinstance(store, ExtractedFeatureStore):
        extractor = store.manifest.get("extractor", {})
        tokens = extractor.get("tokens", "grid")
        backbone = extractor.get("backbone") or extractor.get("checkpoint")
        processor = extractor.get("image_processor", {})
        preprocessing = processor.get("mode")
        return {"kind": "global" if tokens == "global" else "clip_grid", "backbone": backbone,
                "preprocessing": preprocessing, "box_mode": extractor.get("box_mode")}  # fmt: skip
    if isinstance(store, (FasterRCNNFeatures, LXMERTTSVFeatures)):
        return {"kind": "faster_rcnn"}
    if isinstance(store, (PerImageCLIPFeatures, CLIPGridFeatures)):
        match = _CLIP_FOLDER.search(os.path.basename(os.path.normpath(store.path or "")))
        described = {"kind": "clip_grid", "preprocessing": "vl_adapter"}
        if match:
            described["backbone"] = match["backbone"]
        return described
    if store.__class__.__name__ == "GlobalVectorStore":
        return {"kind": "global"}
    return {}


def _fix(expected: Mapping) -> str:
    command = expected.get("extract")
    return f"; make them with: {command}" if command else ""


def check_store_against_expected(store: FeatureStore | None, expected: Mapping | None) -> None:
    """Refuse a store whose own description (extract-features manifest, original file layout, folder name)
    contradicts the checkpoint's `visual_features` (another backbone, grid vs regions, another preprocessing)."""
    if store is None or not expected:
        return
    described = store_feature_description(store)
    where = describe_store(store)
    needed = expected.get("description") or expected.get("kind")
    for field in ("kind", "backbone", "preprocessing"):
        have, want = described.get(field), expected.get(field)
        if have is None or want is None or str(have) == str(want):
            continue
        raise ValueError(
            f"{where} holds {field}={have!r} features but this checkpoint was trained on {needed} ({field}={want!r}, "
            f"config.visual_features){_fix(expected)}"
        )


def check_visual_features(entry: Mapping, expected: Mapping | None, where: str, n_images: int = 1) -> None:
    """One image's (or one query's) features against the checkpoint's `visual_features`: feature size, token count
    (a multiple up to `n_images` images), and boxes when the checkpoint needs real ones (Faster R-CNN regions)."""
    if not expected:
        return
    feats = np.asarray(entry["visual_feats"])
    needed = expected.get("description") or expected.get("kind")
    feat_dim, num_tokens = expected.get("feat_dim"), expected.get("num_tokens")
    if feats.ndim == 2 and feat_dim is not None and feats.shape[1] != feat_dim:
        raise ValueError(
            f"{where}: {feats.shape[1]}-d visual features, but this checkpoint needs {feat_dim}-d ones ({needed}, "
            f"config.visual_features.feat_dim){_fix(expected)}"
        )
    if feats.ndim == 2 and num_tokens is not None:
        count = feats.shape[0]
        if count % num_tokens or not 1 <= count // num_tokens <= max(1, n_images):
            raise ValueError(
                f"{where}: {count} visual tokens, but this checkpoint needs {num_tokens} per image ({needed}, "
                f"config.visual_features.num_tokens){_fix(expected)}"
            )
    if expected.get("boxes"):
        boxes = entry.get("visual_pos")
        if boxes is None or not np.any(np.asarray(boxes)):
            raise ValueError(
                f"{where}: the features have no boxes ({'none given' if boxes is None else 'all zero'}), but this "
                f"checkpoint needs each region's box ({needed}, config.visual_features.boxes): give the detector's "
                f"boxes (an *_obj36.h5 file's `boxes`, or `NAME.visual_pos` in a .npz){_fix(expected)}"
            )


# ------------------------------------------------------------------------------------------------ the opener
def _is_store(value: Any) -> bool:
    return all(hasattr(value, name) for name in ("__contains__", "__getitem__", "keys", "path"))


def open_feature_store(
    source: Any,
    *,
    n_boxes: int | None = N_BOXES,
    box_tolerance: float = BOX_TOLERANCE,
    clamp_boxes: bool = False,
    feat_dim: int | None = None,
) -> FeatureStore | None:
    """
    Any accepted source (see the module docstring) -> a `FeatureStore`, or None for None. Paths are opened once; a
    store passes through unchanged, so callers can open what they are given without re-reading files.

    The options apply to the original projects' layouts: `n_boxes` (Faster R-CNN HDF5 / TSV: features per image read
    exactly, 36 as VL-T5's loaders; None reads every row), `box_tolerance` / `clamp_boxes` (boxes outside the originals'
    tolerance raise, or are clipped), `feat_dim` (checked on read).
    """
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(source))
        options = dict(n_boxes=n_boxes, box_tolerance=box_tolerance, clamp_boxes=clamp_boxes)
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, EXTRACTION_MANIFEST)):
                return ExtractedFeatureStore(path)
            with os.scandir(path) as entries:
                has_h5 = any(e.name.endswith(".h5") for e in entries)
            if has_h5:
                return PerImageCLIPFeatures(path, feat_dim=feat_dim)
            raise ValueError(
                f"feature store {path!r} is a folder without {EXTRACTION_MANIFEST} and without .h5 files: give an "
                f"extract-features output folder, VL-Adapter's per-image folder (data_clip_RN101_att/{{img_id}}.h5), "
                f"or a .npz / .safetensors / .h5 / .tsv file of features"
            )
        if not os.path.isfile(path):
            raise ValueError(
                f"feature store {path!r} does not exist: give the .npz / .safetensors / .h5 / .tsv file of features, "
                f"VL-Adapter's per-image folder or an extract-features output folder"
            )
        if path.lower().endswith(HDF5_SUFFIXES + TSV_SUFFIXES):
            return open_feature_file(path, feat_dim=feat_dim, **options)
        if path.lower().endswith((".npz", ".safetensors")):
            return load_array_store(path)
        raise ValueError(
            f"feature store {path!r}: unknown kind of file; give a .npz, .safetensors, .h5 or LXMERT .tsv file, "
            f"VL-Adapter's per-image folder, or an extract-features output folder"
        )
    if _is_store(source):
        return source
    if isinstance(source, Mapping) or all(hasattr(source, name) for name in ("__contains__", "__getitem__", "keys")):
        return MappingFeatureStore(source, getattr(source, "path", None))
    raise ValueError(
        "feature_store must be a .npz / .safetensors / .h5 / .tsv path, a feature folder or a mapping key -> "
        f"features, got {type(source).__name__}"
    )


def referenced_store_keys(images: Sequence[Any] | None, store: FeatureStore | None) -> list[str]:
    """The distinct feature-store keys among `images`, sorted."""
    if images is None or store is None:
        return []
    return sorted({image for image in images if isinstance(image, str) and image in store})


def feature_store_fingerprint(store: FeatureStore, keys: Sequence[str]) -> str:
    """sha256 over each key's name and its arrays' dtype, shape and bytes: changes when any referenced feature does."""
    digest = hashlib.sha256(f"{len(keys)};".encode())
    for key in keys:
        entry = store[key]
        digest.update(f"{len(key)}:{key};".encode())
        for array in (entry.get("visual_feats"), entry.get("visual_pos")):
            if array is None:
                digest.update(b"none;")
                continue
            array = np.ascontiguousarray(np.asarray(array))
            digest.update(f"{array.dtype.str}:{array.shape};".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


__all__ = [
    "CLIPGridFeatures",
    "ExtractedFeatureStore",
    "FasterRCNNFeatures",
    "FeatureStore",
    "LXMERTTSVFeatures",
    "MappingFeatureStore",
    "N_BOXES",
    "PerImageCLIPFeatures",
    "VISUAL_FEATURE_KINDS",
    "check_store_against_expected",
    "check_visual_features",
    "clip_grid_entry",
    "describe_store",
    "faster_rcnn_entry",
    "feature_store_fingerprint",
    "load_array_store",
    "load_feature_file",
    "open_feature_file",
    "open_feature_store",
    "referenced_store_keys",
    "store_feature_description",
    "tsv_to_h5",
]
