"""Image references of queries and passages: the one place that says what a cell of an `image` column points to.

A reference is one of:
- None (no image);
- a string: a key of the feature store, else a file path (relative to `image_root`): an image file, or a feature
  file of one image (`.npy` / `.npz` / `.safetensors`);
- a `datasets.Image(decode=False)` cell `{"bytes", "path"}` (an empty cell is no image);
- an inline array (V, feat_dim) or a dict with `visual_feats` (precomputed features);
- a PIL image.

`classify` tells what a reference is without reading any file (cheap enough for millions of cells: it checks that
files exist); `resolve_visual` reads it at batch time; `check_image_references` refuses unresolvable references before
the first batch, so a wrong key fails in seconds, not hours into an encoding.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .feature_stores import FEATURE_FILE_SUFFIXES, FeatureStore, describe_store, load_feature_file


# kinds returned by `classify`
NONE, STORE_KEY, IMAGE_FILE, FEATURE_FILE, IMAGE_BYTES, INLINE_FEATURES, PIL_IMAGE, MISSING = (
    "none", "store_key", "image_file", "feature_file", "image_bytes", "inline_features", "pil_image", "missing",
)  # fmt: skip


def resolved_path(reference: str, image_root: str | None) -> str:
    """Where a file reference points: relative paths are relative to `image_root`."""
    return os.path.join(image_root, reference) if image_root and not os.path.isabs(reference) else reference


def is_image_cell(value: Any) -> bool:
    """A `datasets.Image(decode=False)` cell: a dict with `bytes` and/or `path`."""
    return isinstance(value, Mapping) and ("bytes" in value or "path" in value) and "visual_feats" not in value


def classify(value: Any, feature_store: FeatureStore | None = None, image_root: str | None = None) -> str:
    """What `value` is (one of the kinds above); `MISSING` for a file reference whose file does not exist."""
    if value is None:
        return NONE
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if is_image_cell(value):
        if value.get("bytes"):
            return IMAGE_BYTES
        if not value.get("path"):
            return NONE
        return IMAGE_FILE if os.path.isfile(resolved_path(value["path"], image_root)) else MISSING
    if isinstance(value, str):
        if feature_store is not None and value in feature_store:
            return STORE_KEY
        if not os.path.isfile(resolved_path(value, image_root)):
            return MISSING
        return FEATURE_FILE if value.lower().endswith(FEATURE_FILE_SUFFIXES) else IMAGE_FILE
    if isinstance(value, Mapping) and "visual_feats" in value:
        return INLINE_FEATURES
    if hasattr(value, "mode") and hasattr(value, "convert"):
        return PIL_IMAGE
    if isinstance(value, (list, np.ndarray)) or hasattr(value, "detach"):
        return INLINE_FEATURES
    raise ValueError(f"cannot read an image reference of type {type(value).__name__}: {value!r:.80}")


def shown(value: Any) -> Any:
    """A reference as an error message shows it (the path of an image cell)."""
    return value.get("path") if is_image_cell(value) else value


def reference_key(value: Any) -> str:
    """A stable string for a reference (path, hash of in-memory bytes or pixels): what identifies the image in a KB
    fingerprint and in caches keyed by image."""
    if value is None:
        return ""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return hashlib.sha256(value["bytes"]).hexdigest()
        return str(value.get("path") or "")
    if hasattr(value, "tobytes"):
        return hashlib.sha256(value.tobytes()).hexdigest()
    return repr(value)


def resolve_visual(
    value: Any, feature_store: FeatureStore | None = None, image_root: str | None = None
) -> tuple[str, Any] | None:
    """
    One reference -> `("features", {"visual_feats": (V, C), "visual_pos": (V, 4) | None, "source": str})`,
    `("image", PIL.Image)`, or None. Image files are opened here (at batch time) with `images.load_image`, whose
    errors name the file.
    """
    from ..images import load_image

    kind = classify(value, feature_store, image_root)
    if kind == NONE:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if kind == STORE_KEY:
        entry = feature_store[value]
        feats = np.asarray(entry["visual_feats"]) if isinstance(entry, Mapping) else np.asarray(entry)
        pos = entry.get("visual_pos") if isinstance(entry, Mapping) else None
        return "features", {"visual_feats": feats, "visual_pos": pos, "source": f"feature-store key {value!r}"}
    if kind == MISSING:
        path = resolved_path(shown(value), image_root)
        if path.lower().endswith(FEATURE_FILE_SUFFIXES):
            raise ValueError(f"visual feature file {path!r} does not exist (check image_root / the feature store)")
        hint = "" if feature_store is None else " and is not a key of the feature store"
        raise ValueError(f"image {path!r} does not exist{hint}: check image_root ({image_root!r}) or the data")
    if kind == FEATURE_FILE:
        path = resolved_path(value, image_root)
        return "features", {**load_feature_file(path), "source": f"feature file {path!r}"}
    if kind == IMAGE_FILE:
        return "image", load_image(resolved_path(shown(value), image_root))
    if kind == IMAGE_BYTES:
        return "image", load_image(value["bytes"])
    if kind == PIL_IMAGE:
        return "image", value
    if isinstance(value, Mapping):
        return "features", {"visual_feats": np.asarray(value["visual_feats"]), "visual_pos": value.get("visual_pos")}
    array = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"inline visual features must be (visual_tokens, feat_dim), got shape {array.shape}")
    return "features", {"visual_feats": array, "visual_pos": None}


def unresolvable_references(
    images: Sequence[Any], feature_store: FeatureStore | None, image_root: str | None
) -> list[int]:
    """Rows whose file reference is neither a feature-store key nor an existing file."""
    return [row for row, image in enumerate(images) if classify(image, feature_store, image_root) == MISSING]


def check_image_references(
    ids: Sequence[str],
    images: Sequence[Any] | None,
    feature_store: FeatureStore | None,
    image_root: str | None,
    what: str = "passages",
    require_all: bool = False,
) -> None:
    """
    Raise a ValueError naming a few rows whose references resolve to neither a store key nor a file; with
    `require_all`, also rows without any image (a query table with an image column must give every query one).
    """
    if images is None:
        return
    kinds = [classify(image, feature_store, image_root) for image in images]
    bad = [row for row, kind in enumerate(kinds) if kind == MISSING or (require_all and kind == NONE)]
    if not bad:
        return
    examples = ", ".join(f"{ids[r]}: {shown(images[r])!r}" for r in bad[:5])
    where = f" under image_root {image_root!r}" if image_root else ""
    if require_all:
        store_hint = f" nor a key of {describe_store(feature_store)}" if feature_store is not None else ""
        raise ValueError(
            f"{len(bad)} {what} have no image (or its reference is neither an existing file{where}{store_hint}), "
            f"e.g. {examples}: fix the paths / keys, pass --image_root / --feature_store, or drop the image column "
            f"to search with text only"
        )
    if feature_store is not None:
        keys = ", ".join(repr(k) for k in list(feature_store.keys())[:3])
        raise ValueError(
            f"{len(bad)} {what} reference images that are neither keys of {describe_store(feature_store)} nor "
            f"existing files{where}, e.g. {examples}. The store has {len(feature_store)} keys (e.g. {keys}): check "
            f"that the image column holds its keys, or pass the store the features were extracted into"
        )
    raise ValueError(
        f"{len(bad)} {what} reference image files that do not exist{where}, e.g. {examples}: fix the paths, pass "
        f"--image_root, or pass --feature_store if these are keys of precomputed features"
    )


def reference_counts(
    images: Sequence[Any], feature_store: FeatureStore | None, image_root: str | None
) -> dict[str, int]:
    """`{"found": n, "missing": n, "none": n}` over a column of references (for data-report)."""
    counts = {"found": 0, "missing": 0, "none": 0}
    for image in images:
        kind = classify(image, feature_store, image_root)
        counts["none" if kind == NONE else "missing" if kind == MISSING else "found"] += 1
    return counts


__all__ = [
    "check_image_references",
    "classify",
    "reference_counts",
    "reference_key",
    "resolve_visual",
    "resolved_path",
    "unresolvable_references",
]
