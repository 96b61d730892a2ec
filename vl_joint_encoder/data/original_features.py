"""The feature files of the original projects, read as their loaders read them (docs/visual_features.md, section 9):
VL-T5 / LXMERT Faster R-CNN HDF5 (`FasterRCNNFeatures`), LXMERT's TSV through the layout of VL-T5's `tsv_to_h5.py`
(`LXMERTTSVFeatures`, `tsv_to_h5`), VL-Adapter's CLIP grids as a folder of one file per image
(`PerImageCLIPFeatures`) or one file with a group per image (`CLIPGridFeatures`). Each is a `FeatureStore`
(`data.feature_stores`), opened there by `open_feature_store`.

Sources: j-min/VL-T5 a07d779 `VL-T5/src/vqa_data.py` 145-171 (and the other `*_data.py`), `feature_extraction/
tsv_to_h5.py`; ylsung/VL_adapter 545fcbb `feature_extraction/coco_CLIP.py`, `VL-T5/src/vqa_clip_data.py` 159-191,
`nlvr_clip_data.py` 120-135.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..processing_joint_encoder import BOX_TOLERANCE, normalize_boxes
from ..utils.io import atomic_path


HDF5_SUFFIXES = (".h5", ".hdf5")
TSV_SUFFIXES = (".tsv",)
# VL-T5's loaders read `--n_boxes` (default 36, param.py) features per image: `np.zeros((n_boxes, 2048))` filled by
# h5py's `read_direct`, which fails unless the file holds exactly that many rows.
N_BOXES = 36
# LXMERT's TSV columns (airsplay/lxmert, copied in j-min/VL-T5 feature_extraction/tsv_to_h5.py), no header line
LXMERT_TSV_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes",
                     "boxes", "features")


# ------------------------------------------------------------------------------------------------ HDF5 layouts
def _import_h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError(
            "reading HDF5 feature files needs h5py: pip install h5py (or pip install 'vl-joint-encoder[hdf5]')"
        ) from None
    return h5py


def _check_features(feats: np.ndarray, where: str, feat_dim: int | None) -> np.ndarray:
    """(V, C) float32 features, finite, of the model's feat_dim."""
    if feats.ndim != 2:
        raise ValueError(f"{where} must be (num_tokens, dim), got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{where} holds NaN or infinite values (corrupt file)")
    if feat_dim is not None and feats.shape[1] != feat_dim:
        raise ValueError(
            f"{where} has {feats.shape[1]} features per token but the model expects feat_dim={feat_dim}: these "
            f"features come from another backbone"
        )
    return feats


def faster_rcnn_entry(
    where: str,
    feats: np.ndarray,  # (N, C) as stored
    boxes: np.ndarray,  # (N, 4) pixels, float32 as stored
    img_h: Any,
    img_w: Any,
    n_boxes: int | None = N_BOXES,
    feat_dim: int | None = None,
    box_tolerance: float = BOX_TOLERANCE,
    clamp_boxes: bool = False,
) -> dict[str, np.ndarray]:
    """
    One image of a Faster R-CNN file as VL-T5's loaders read it (j-min/VL-T5 `src/vqa_data.py` 145-171; gqa, nlvr,
    pretrain alike): exactly `n_boxes` rows of features as float32 (`read_direct` into an (n_boxes, 2048) array, which
    refuses any other count; `n_boxes=None` reads every row, as `caption_data.py` does), every box divided by img_w /
    img_h, checked against the original tolerance and clipped to [0, 1] (`normalize_boxes`). `where` names the image.
    """
    feats = np.asarray(feats)
    if n_boxes is not None and feats.ndim == 2 and feats.shape[0] != n_boxes:
        raise ValueError(
            f"{where}/features has {feats.shape[0]} boxes but the original loaders read exactly n_boxes={n_boxes} "
            f"(VL-T5 --n_boxes; h5py read_direct into an ({n_boxes}, 2048) array fails otherwise): open the store with "
            f"n_boxes={feats.shape[0]}, or n_boxes=None to read every row"
        )
    feats = _check_features(feats.astype(np.float32, copy=False), f"{where}/features", feat_dim)
    boxes = np.asarray(boxes)
    if boxes.shape != (feats.shape[0], 4):
        raise ValueError(
            f"{where}/boxes has shape {boxes.shape}, expected ({feats.shape[0]}, 4) to match its features"
        )
    height, width = float(np.asarray(img_h)), float(np.asarray(img_w))
    visual_pos = normalize_boxes(
        boxes.astype(np.float32, copy=False), (width, height), box_tolerance, where=f"{where}/boxes", clamp=clamp_boxes
    )
    return {"visual_feats": feats, "visual_pos": visual_pos, "image_size": np.array([width, height])}


class _HDF5Features:
    """A file with one group per image id (the layouts of VL-T5 / LXMERT and VL-Adapter)."""

    required: tuple[str, ...] = ("features",)
    layout = ""

    def __init__(self, path: str | os.PathLike, feat_dim: int | None = None):
        self.path = os.fspath(path)
        self.feat_dim = feat_dim
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

    def _group(self, image_id: str):
        image_id = str(image_id)
        if image_id not in self._handle():
            raise KeyError(f"image id {image_id!r} is not in {self.path!r} ({len(self)} images)")
        self._check_group(image_id)
        return self._handle()[image_id]

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


class FasterRCNNFeatures(_HDF5Features):
    """VL-T5 / LXMERT Faster R-CNN region features (`*_obj36.h5`, also what `tsv_to_h5` writes):
    `reader[image_id]` -> visual_feats (n_boxes, 2048), visual_pos (n_boxes, 4) normalised, image_size (w, h).
    Read as VL-T5's loaders read them (`faster_rcnn_entry`): exactly `n_boxes` features (36, the originals'
    `--n_boxes` default; None: every row), boxes divided by img_w / img_h in float32, a ValueError naming the image and
    the box when a coordinate lies outside the originals' tolerance (their `assert_array_less`; `clamp_boxes=True`
    clips instead), then clipped to [0, 1]."""

    required = ("features", "boxes", "img_h", "img_w")
    layout = "VL-T5/LXMERT Faster R-CNN"

    def __init__(self, path: str | os.PathLike, feat_dim: int | None = None, box_tolerance: float = BOX_TOLERANCE,
                 clamp_boxes: bool = False, n_boxes: int | None = N_BOXES):
        self.box_tolerance = float(box_tolerance)
        self.clamp_boxes = bool(clamp_boxes)
        self.n_boxes = n_boxes
        super().__init__(path, feat_dim)

    def __getitem__(self, image_id: str) -> dict[str, np.ndarray]:
        group = self._group(image_id)
        return faster_rcnn_entry(
            f"{self.path}: {image_id}", group["features"][()], group["boxes"][()], group["img_h"][()],
            group["img_w"][()], self.n_boxes, self.feat_dim, self.box_tolerance, self.clamp_boxes,
        )


def clip_grid_entry(feats: np.ndarray, where: str, feat_dim: int | None = None) -> dict[str, np.ndarray]:
    """One image of VL-Adapter's CLIP features as its loaders read it (`VL-T5/src/vqa_clip_data.py` 159-191):
    `f[f"{img_id}/features"][...]` (float16 (49, 2048)) into a float32 batch, every row, and zero boxes."""
    feats = _check_features(np.asarray(feats).astype(np.float32, copy=False), where, feat_dim)
    return {"visual_feats": feats, "visual_pos": np.zeros((feats.shape[0], 4), dtype=np.float32)}


class CLIPGridFeatures(_HDF5Features):
    """VL-Adapter CLIP grid features in ONE file with a group per image id: `reader[image_id]` -> visual_feats
    (49, C) float32, visual_pos zeros (49, 4). (VL-Adapter's own extraction writes one file per image: see
    `PerImageCLIPFeatures`.)"""

    required = ("features",)
    layout = "VL-Adapter CLIP"

    def __init__(self, path: str | os.PathLike, feat_dim: int | None = None, **_ignored):
        super().__init__(path, feat_dim)

    def __getitem__(self, image_id: str) -> dict[str, np.ndarray]:
        return clip_grid_entry(self._group(image_id)["features"][()], f"{self.path!r}: {image_id}/features",
                               self.feat_dim)


class PerImageCLIPFeatures:
    """
    VL-Adapter's CLIP features as its extraction writes them (ylsung/VL_adapter `feature_extraction/coco_CLIP.py`):
    a folder (`data_clip_RN101_att/`) of one HDF5 file per image, `{img_id}.h5`, holding group `img_id` with dataset
    `features` (49, 2048) float16. `store[img_id]` opens `{img_id}.h5` and reads `f[f"{img_id}/features"][...]` as its
    loaders do (`VL-T5/src/vqa_clip_data.py` 159-191, `nlvr_clip_data.py` 120-135): float32 features (exact: fp16
    values are fp32 values), every row, zero boxes. The keys are the folder's `*.h5` file names, listed once.
    """

    layout = "VL-Adapter per-image CLIP"

    def __init__(self, folder: str | os.PathLike, feat_dim: int | None = None, **_ignored):
        self.path = os.path.abspath(os.fspath(folder))
        self.feat_dim = feat_dim
        self._h5py = _import_h5py()
        if not os.path.isdir(self.path):
            raise ValueError(f"feature folder {self.path!r} does not exist")
        with os.scandir(self.path) as entries:
            self._keys = sorted(e.name[: -len(".h5")] for e in entries if e.name.endswith(".h5") and e.is_file())
        if not self._keys:
            raise ValueError(
                f"{self.path!r} holds no .h5 file: VL-Adapter's CLIP features are one `{{img_id}}.h5` per image "
                f"(data_clip_RN101_att/)"
            )
        self._key_set = set(self._keys)
        self[self._keys[0]]  # the layout (and feat_dim) is checked on the first file, up front

    def _file(self, image_id: str) -> str:
        return os.path.join(self.path, f"{image_id}.h5")

    def _read(self, image_id: str) -> np.ndarray:
        path = self._file(image_id)
        try:
            with self._h5py.File(path, "r") as handle:
                if image_id not in handle or not isinstance(handle[image_id], self._h5py.Group):
                    raise ValueError(
                        f"{path!r} has no group {image_id!r} (it has {sorted(handle.keys())[:5]}): VL-Adapter's layout is "
                        f"group `img_id` with dataset `features` in `{{img_id}}.h5`"
                    )
                group = handle[image_id]
                if "features" not in group:
                    raise ValueError(f"{path!r}: group {image_id!r} lacks 'features' (has {sorted(group.keys())})")
                return group["features"][...]
        except OSError as error:
            raise ValueError(f"{path!r} is not a readable HDF5 file ({error})") from None

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._key_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __getitem__(self, image_id: str) -> dict[str, np.ndarray]:
        if image_id not in self._key_set:
            raise KeyError(f"image id {image_id!r} is not in {self.path!r} (no {image_id}.h5; {len(self)} images)")
        return clip_grid_entry(self._read(image_id), f"{self._file(image_id)!r}: {image_id}/features", self.feat_dim)


# ------------------------------------------------------------------------------------------------ LXMERT TSV
def _decode_tsv_row(fields: list[str], where: str) -> dict[str, Any]:
    """One TSV row as the originals' `load_obj_tsv` decodes it (j-min/VL-T5 `feature_extraction/tsv_to_h5.py`)."""
    import base64

    if len(fields) != len(LXMERT_TSV_FIELDS):
        raise ValueError(
            f"{where} has {len(fields)} tab-separated fields, LXMERT's TSV has {len(LXMERT_TSV_FIELDS)} "
            f"({', '.join(LXMERT_TSV_FIELDS)})"
        )
    item = dict(zip(LXMERT_TSV_FIELDS, fields))
    try:
        for key in ("img_h", "img_w", "num_boxes"):
            item[key] = int(item[key])
        boxes = item["num_boxes"]
        for key, shape, dtype in (
            ("objects_id", (boxes,), np.int64),
            ("objects_conf", (boxes,), np.float32),
            ("attrs_id", (boxes,), np.int64),
            ("attrs_conf", (boxes,), np.float32),
            ("boxes", (boxes, 4), np.float32),
            ("features", (boxes, -1), np.float32),
        ):
            item[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dtype).reshape(shape)
        # tsv_to_h5.py stores features.reshape(num_boxes, 2048)
        item["features"] = item["features"].reshape(boxes, 2048)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where} (image {item['img_id']!r}) is not a valid LXMERT TSV row: {error}") from None
    return item


def _tsv_rows(path: str) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of every row; rows hold one image each, ~400 KB for 36 boxes."""
    with open(path, "rb") as handle:
        offset = 0
        for line in handle:
            yield offset, line
            offset += len(line)


def _parse_tsv_line(line: bytes) -> list[str]:
    import csv

    csv.field_size_limit(sys.maxsize)  # as tsv_to_h5.py: a row is far longer than csv's default limit
    return next(csv.reader([line.decode("utf-8").rstrip("\r\n")], delimiter="\t"))


class LXMERTTSVFeatures:
    """
    LXMERT's Faster R-CNN TSV (`train2014_obj36.tsv`: one row per image, `img_id, img_h, img_w, objects_id,
    objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features`, arrays in base64), read through the layout the
    originals' `tsv_to_h5.py` converts it to: `store[img_id]` equals `FasterRCNNFeatures` on `tsv_to_h5`'s output
    (same `n_boxes`, box normalisation, tolerance and clamp). Opening scans the file once for the rows' offsets (a
    few minutes for COCO's 17 GB train2014 file); `tsv_to_h5` converts it for good.
    """

    layout = "LXMERT TSV"

    def __init__(self, path: str | os.PathLike, feat_dim: int | None = None, box_tolerance: float = BOX_TOLERANCE,
                 clamp_boxes: bool = False, n_boxes: int | None = N_BOXES):
        from tqdm.auto import tqdm

        self.path = os.path.abspath(os.fspath(path))
        self.feat_dim, self.n_boxes = feat_dim, n_boxes
        self.box_tolerance, self.clamp_boxes = float(box_tolerance), bool(clamp_boxes)
        if not os.path.isfile(self.path):
            raise ValueError(f"feature file {self.path!r} does not exist")
        self._offsets: dict[str, int] = {}
        size = os.path.getsize(self.path)
        with tqdm(total=size, unit="B", unit_scale=True, desc="index TSV", disable=size < 200_000_000) as bar:
            for row, (offset, line) in enumerate(_tsv_rows(self.path)):
                bar.update(len(line))
                image_id = line.split(b"\t", 1)[0].decode("utf-8", errors="replace")
                if image_id in self._offsets:  # tsv_to_h5's create_group(img_id) would fail on it too
                    raise ValueError(f"{self.path}: image id {image_id!r} appears twice (rows {row + 1} and more)")
                self._offsets[image_id] = offset
        if not self._offsets:
            raise ValueError(f"{self.path!r} holds no row")
        self[next(iter(self._offsets))]  # the layout is checked on the first row, up front

    def __len__(self) -> int:
        return len(self._offsets)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._offsets

    def __iter__(self) -> Iterator[str]:
        return iter(self._offsets)

    def keys(self) -> list[str]:
        return list(self._offsets)

    def row(self, image_id: str) -> dict[str, Any]:
        """The decoded row of `image_id` (every TSV field, as `load_obj_tsv` gives it)."""
        if image_id not in self._offsets:
            raise KeyError(f"image id {image_id!r} is not in {self.path!r} ({len(self)} images)")
        with open(self.path, "rb") as handle:
            handle.seek(self._offsets[image_id])
            line = handle.readline()
        return _decode_tsv_row(_parse_tsv_line(line), f"{self.path}: the row of {image_id!r}")

    def __getitem__(self, image_id: str) -> dict[str, np.ndarray]:
        item = self.row(image_id)
        return faster_rcnn_entry(
            f"{self.path}: {image_id}", item["features"], item["boxes"], item["img_h"], item["img_w"], self.n_boxes,
            self.feat_dim, self.box_tolerance, self.clamp_boxes,
        )


def tsv_to_h5(tsv_path: str | os.PathLike, h5_path: str | os.PathLike) -> int:
    """
    Convert LXMERT's TSV to the HDF5 layout VL-T5 reads, as its `feature_extraction/tsv_to_h5.py` does (a group per
    image id with `features` (num_boxes, 2048), `obj_id`, `obj_conf`, `attr_id`, `attr_conf`, `boxes`, `img_w`,
    `img_h`), row by row (not all in memory) and atomically (the file appears complete or not at all). Returns the
    number of images.
    """
    from tqdm.auto import tqdm

    h5py = _import_h5py()
    tsv_path = os.fspath(tsv_path)
    if not os.path.isfile(tsv_path):
        raise ValueError(f"TSV file {tsv_path!r} does not exist")
    size = os.path.getsize(tsv_path)
    count = 0
    with atomic_path(h5_path) as tmp, h5py.File(tmp, "w") as handle:
        with tqdm(total=size, unit="B", unit_scale=True, desc="tsv_to_h5", disable=size < 200_000_000) as bar:
            for row, (_, line) in enumerate(_tsv_rows(tsv_path)):
                bar.update(len(line))
                item = _decode_tsv_row(_parse_tsv_line(line), f"{tsv_path}: row {row + 1}")
                if item["img_id"] in handle:
                    raise ValueError(f"{tsv_path}: image id {item['img_id']!r} appears twice (row {row + 1})")
                group = handle.create_group(item["img_id"])
                group["features"] = item["features"]
                group["obj_id"] = item["objects_id"]
                group["obj_conf"] = item["objects_conf"]
                group["attr_id"] = item["attrs_id"]
                group["attr_conf"] = item["attrs_conf"]
                group["boxes"] = item["boxes"]
                group["img_w"] = item["img_w"]
                group["img_h"] = item["img_h"]
                count += 1
    return count


def open_feature_file(path: str | os.PathLike, feat_dim: int | None = None, **options) -> Any:
    """Open an HDF5 feature file, telling the layout from its first group (boxes + img_h/img_w: Faster R-CNN), an
    LXMERT `.tsv`, or VL-Adapter's folder of per-image files. `options`: `n_boxes`, `box_tolerance`, `clamp_boxes`
    (Faster R-CNN layouts)."""
    if os.fspath(path).lower().endswith(TSV_SUFFIXES):
        return LXMERTTSVFeatures(path, feat_dim=feat_dim, **options)
    if os.path.isdir(path):  # VL-Adapter's folder of one file per image
        return PerImageCLIPFeatures(path, feat_dim=feat_dim)
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
        return FasterRCNNFeatures(path, feat_dim=feat_dim, **options)
    return CLIPGridFeatures(path, feat_dim=feat_dim)


__all__ = [
    "CLIPGridFeatures",
    "FasterRCNNFeatures",
    "HDF5_SUFFIXES",
    "LXMERTTSVFeatures",
    "N_BOXES",
    "PerImageCLIPFeatures",
    "TSV_SUFFIXES",
    "clip_grid_entry",
    "faster_rcnn_entry",
    "open_feature_file",
    "tsv_to_h5",
]
