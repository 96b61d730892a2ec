"""Feature stores: precomputed visual features by key, one protocol and one opener for every layout.

A feature store maps an image key (the `image` cell of a query or passage) to its features:
`store[key] -> {"visual_feats": (V, C) float32, "visual_pos": (V, 4) in [0, 1] or None, ...}`, with `key in store`,
`store.keys()`, `len(store)` and `store.path` (where it was read from, or None). `open_feature_store` accepts:

- a `.npz` / `.safetensors` file: key `NAME` -> features (V, C), optional key `NAME.visual_pos` -> boxes (V, 4);
- a `vl-joint-encoder extract-features` output folder (`manifest.json` + shards; written by `data.extraction`);
- an HDF5 file in the VL-T5 / LXMERT Faster R-CNN layout (a group per image id with `features`, `boxes` in pixels,
  `img_h`, `img_w`; boxes normalised as VL-T5 does) or the VL-Adapter CLIP-grid layout (a group per image id with
  `features`; zero boxes) (j-min/VL-T5 `src/*_data.py`, ylsung/VL_adapter `feature_extraction/`);
- a store already opened, or any mapping key -> array (V, C) or -> dict as above.

A single image may also point to its own feature file (`.npy` / `.npz` / `.safetensors`), read by
`load_feature_file`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from transformers.utils import logging

from ..processing_joint_encoder import normalize_boxes
from ..utils.io import read_json


logger = logging.get_logger(__name__)

FEATURE_FILE_SUFFIXES = (".npy", ".npz", ".safetensors")
HDF5_SUFFIXES = (".h5", ".hdf5")
# the extract-features folder layout (written by data.extraction, read by ExtractedFeatureStore)
EXTRACTION_MANIFEST = "manifest.json"
EXTRACTED_ARRAYS = ("visual_feats", "visual_pos", "pooled")


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
    """An `extract-features` output folder: `store[image_id]` -> visual_feats (V, C), visual_pos (V, 4), pooled (C,).
    Shards are read on first use and kept."""

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
            return {key: shard[key][row] for key in EXTRACTED_ARRAYS}
        record = shard[row]
        return {key: np.asarray(record[key], dtype=np.float32) for key in EXTRACTED_ARRAYS}


# ------------------------------------------------------------------------------------------------ HDF5 layouts
def _import_h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError(
            "reading HDF5 feature files needs h5py: pip install h5py (or pip install 'vl-joint-encoder[hdf5]')"
        ) from None
    return h5py


class _HDF5Features:
    """A file with one group per image id (the layouts of VL-T5 / LXMERT and VL-Adapter)."""

    required: tuple[str, ...] = ("features",)
    layout = ""

    def __init__(self, path: str | os.PathLike, feat_dim: int | None = None, box_tolerance: float = 0.05):
        self.path = os.fspath(path)
        self.feat_dim = feat_dim
        self.box_tolerance = box_tolerance
        self._h5py = _import_h5py()
        if not os.path.isfile(self.path):
            raise ValueError(f"feature file {self.path!r} does not exist")
        self._file = None
        self._pid = None
        try:
            first = next(iter(self._handle()), None)
        except OSError as error:
            raise ValueError(f"{self.path!r} is not a readable HDF5 file ({error})") from None
        if first is None:
            raise ValueError(f"{self.path!r} holds no image group")
        self._check_group(first)

    def _handle(self):
        # h5py handles must not cross a fork (DataLoader workers): reopen in each process
        if self._file is None or self._pid != os.getpid():
            self._file = self._h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def _check_group(self, image_id: str):
        group = self._handle()[image_id]
        if not isinstance(group, self._h5py.Group):
            raise ValueError(
                f"{self.path!r}: {image_id!r} is a dataset, not a group: expected one group per image id with "
                f"{list(self.required)} ({self.layout} layout)"
            )
        missing = [name for name in self.required if name not in group]
        if missing:
            raise ValueError(
                f"{self.path!r}: group {image_id!r} lacks {missing} (has {sorted(group.keys())}); the {self.layout} "
                f"layout needs {list(self.required)} per image id"
            )

    def __len__(self) -> int:
        return len(self._handle())

    def __contains__(self, image_id: object) -> bool:
        return str(image_id) in self._handle()

    def __iter__(self) -> Iterator[str]:
        return iter(self._handle().keys())

    def keys(self) -> list[str]:
        return list(self._handle().keys())

    def _features(self, image_id: str) -> np.ndarray:
        image_id = str(image_id)
        if image_id not in self._handle():
            raise KeyError(f"image id {image_id!r} is not in {self.path!r} ({len(self)} images)")
        self._check_group(image_id)
        feats = np.asarray(self._handle()[image_id]["features"][()], dtype=np.float32)
        if feats.ndim != 2:
            raise ValueError(f"{self.path!r}: {image_id}/features must be (num_tokens, dim), got shape {feats.shape}")
        if not np.isfinite(feats).all():
            raise ValueError(f"{self.path!r}: {image_id}/features holds NaN or infinite values (corrupt file)")
        if self.feat_dim is not None and feats.shape[1] != self.feat_dim:
            raise ValueError(
                f"{self.path!r}: {image_id}/features has {feats.shape[1]} features per token but the model expects "
                f"feat_dim={self.feat_dim}: these features come from another backbone"
            )
        return feats

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


class FasterRCNNFeatures(_HDF5Features):
    """VL-T5 / LXMERT Faster R-CNN region features: `reader[image_id]` -> visual_feats (36, 2048), visual_pos (36, 4).

    VL-T5 divides x by img_w and y by img_h, asserts the result lies in [-1e-5, 1 + 1e-5] and clips to [0, 1]; here
    the same, with a clear error (`box_tolerance`) instead of an assert."""

    required = ("features", "boxes", "img_h", "img_w")
    layout = "VL-T5/LXMERT Faster R-CNN"

    def __getitem__(self, image_id: str) -> dict[str, np.ndarray]:
        feats = self._features(image_id)
        group = self._handle()[str(image_id)]
        boxes = np.asarray(group["boxes"][()], dtype=np.float64)  # (V, 4) pixels
        height, width = float(np.asarray(group["img_h"][()])), float(np.asarray(group["img_w"][()]))
        if boxes.shape != (feats.shape[0], 4):
            raise ValueError(
                f"{self.path!r}: {image_id}/boxes has shape {boxes.shape}, expected ({feats.shape[0]}, 4) to match "
                f"its features"
            )
        visual_pos = normalize_boxes(boxes, (width, height), self.box_tolerance, where=f"{self.path}: {image_id}/boxes")
        return {"visual_feats": feats, "visual_pos": visual_pos, "image_size": np.array([width, height])}


class CLIPGridFeatures(_HDF5Features):
    """VL-Adapter CLIP grid features: `reader[image_id]` -> visual_feats (49, C), visual_pos zeros (49, 4)."""

    required = ("features",)
    layout = "VL-Adapter CLIP"

    def __getitem__(self, image_id: str) -> dict[str, np.ndarray]:
        feats = self._features(image_id)
        return {"visual_feats": feats, "visual_pos": np.zeros((feats.shape[0], 4), dtype=np.float32)}


def open_feature_file(path: str | os.PathLike, feat_dim: int | None = None, **kwargs) -> _HDF5Features:
    """Open an HDF5 feature file, telling the layout from its first group (boxes + img_h/img_w: Faster R-CNN)."""
    h5py = _import_h5py()
    if not os.path.isfile(path):
        raise ValueError(f"feature file {os.fspath(path)!r} does not exist")
    try:
        with h5py.File(path, "r") as handle:
            first = next(iter(handle), None)
            keys = set(handle[first].keys()) if first is not None and isinstance(handle[first], h5py.Group) else set()
    except OSError as error:
        raise ValueError(f"{os.fspath(path)!r} is not a readable HDF5 file ({error})") from None
    if {"boxes", "img_h", "img_w"} <= keys:
        return FasterRCNNFeatures(path, feat_dim=feat_dim, **kwargs)
    return CLIPGridFeatures(path, feat_dim=feat_dim, **kwargs)


# ------------------------------------------------------------------------------------------------ the opener
def _is_store(value: Any) -> bool:
    return all(hasattr(value, name) for name in ("__contains__", "__getitem__", "keys", "path"))


def open_feature_store(source: Any) -> FeatureStore | None:
    """
    Any accepted source (see the module docstring) -> a `FeatureStore`, or None for None. Paths are opened once; a
    store passes through unchanged, so callers can open what they are given without re-reading files.
    """
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(source))
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, EXTRACTION_MANIFEST)):
                return ExtractedFeatureStore(path)
            raise ValueError(
                f"feature store {path!r} is a folder without {EXTRACTION_MANIFEST}: give an extract-features output "
                f"folder, or a .npz / .safetensors / .h5 file of features"
            )
        if not os.path.isfile(path):
            raise ValueError(
                f"feature store {path!r} does not exist: give the .npz / .safetensors / .h5 file of features or an "
                f"extract-features output folder"
            )
        if path.lower().endswith(HDF5_SUFFIXES):
            return open_feature_file(path)
        if path.lower().endswith((".npz", ".safetensors")):
            return load_array_store(path)
        raise ValueError(
            f"feature store {path!r}: unknown kind of file; give a .npz, .safetensors or .h5 file, or an "
            f"extract-features output folder"
        )
    if _is_store(source):
        return source
    if isinstance(source, Mapping) or all(hasattr(source, name) for name in ("__contains__", "__getitem__", "keys")):
        return MappingFeatureStore(source, getattr(source, "path", None))
    raise ValueError(
        "feature_store must be a .npz / .safetensors / .h5 path, an extract-features folder or a mapping key -> "
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
    "MappingFeatureStore",
    "describe_store",
    "feature_store_fingerprint",
    "load_array_store",
    "load_feature_file",
    "open_feature_file",
    "open_feature_store",
    "referenced_store_keys",
]
