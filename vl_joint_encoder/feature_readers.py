"""Readers for the precomputed visual feature files of VL-T5 / LXMERT and VL-Adapter (HDF5, h5py optional).

- VL-T5 / LXMERT Faster R-CNN (j-min/VL-T5 `src/*_data.py`, e.g. `COCO/features/train2014_obj36.h5`): one group per
  image id with `features` (36, 2048) float32, `boxes` (36, 4) in pixels (x1, y1, x2, y2), `img_h`, `img_w`.
  VL-T5 divides x by img_w and y by img_h, asserts the result lies in [-1e-5, 1 + 1e-5] and clips to [0, 1]; here
  the same, with a clear error (`box_tolerance`) instead of an assert.
- VL-Adapter CLIP grids (ylsung/VL_adapter `feature_extraction/`, e.g. `COCO/clip_features/..._RN101.h5`): one group
  per image id with `features` (49, C) (a 7 x 7 grid); VL-Adapter feeds zero boxes, and so does this reader.

Each item is a dict `visual_feats` (V, C) float32, `visual_pos` (V, 4) in [0, 1], ready for
`JointEncoderProcessor(visual_feats=[...], boxes=[...])` (normalised boxes, no image_size needed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from transformers.utils import logging

from .processing_joint_encoder import normalize_boxes


logger = logging.get_logger(__name__)


def _import_h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError(
            "reading HDF5 feature files needs h5py: pip install h5py (or pip install 'vl-joint-encoder[hdf5]')"
        ) from None
    return h5py


class _HDF5Features:
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

    def __contains__(self, image_id: str) -> bool:
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
    """VL-T5 / LXMERT Faster R-CNN region features: `reader[image_id]` -> visual_feats (36, 2048), visual_pos (36, 4)."""

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
    with h5py.File(path, "r") as handle:
        first = next(iter(handle), None)
        keys = set(handle[first].keys()) if first is not None and isinstance(handle[first], h5py.Group) else set()
    if {"boxes", "img_h", "img_w"} <= keys:
        return FasterRCNNFeatures(path, feat_dim=feat_dim, **kwargs)
    return CLIPGridFeatures(path, feat_dim=feat_dim, **kwargs)


__all__ = ["CLIPGridFeatures", "FasterRCNNFeatures", "open_feature_file"]
