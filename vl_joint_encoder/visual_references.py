"""Image references of queries / passages outside training: open a feature store, check references, fingerprint keys.

An image reference (`collator.resolve_visual`) is a file path (relative to `image_root`), a PIL image, a
`datasets.Image` cell, or a key of a feature store (`data.load_feature_store`: `{key: {"visual_feats": (V, C),
"visual_pos": (V, 4) | None}}`, the precomputed CLIP / Faster R-CNN features of ViQuAE-style setups). Encoding, search
and evaluation check every reference before the first batch (a wrong key fails in seconds, not hours into an
encoding), and an encoding records a hash of the features its KB references so that a changed store is not resumed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from transformers.utils import logging


logger = logging.get_logger(__name__)


class LoadedFeatureStore(dict):
    """`data.load_feature_store`'s mapping that remembers its file (for error messages and encoding manifests)."""

    def __init__(self, entries: Mapping[str, Any], path: str):
        super().__init__(entries)
        self.path = path


def open_feature_store(feature_store: Any) -> tuple[Mapping[str, Any] | None, str | None]:
    """
    `feature_store` -> (mapping or None, its absolute path or None). Accepted: None; a `.npz` / `.safetensors` file
    (read once with `data.load_feature_store` into a `LoadedFeatureStore`, which keeps its path when passed on
    again); a `vl-joint-encoder extract-features` output folder (`extract_features.FeatureStore`, shards read on
    demand); or an already loaded mapping / any object with `in`, `[key]` and `keys()`.
    """
    if feature_store is None:
        return None, None
    if isinstance(feature_store, LoadedFeatureStore):
        return feature_store, feature_store.path
    if isinstance(feature_store, (str, os.PathLike)):
        from .data import load_feature_store

        path = os.path.abspath(os.fspath(feature_store))
        if os.path.isdir(path):
            from .extract_features import FeatureStore

            return FeatureStore(path), path
        if not os.path.isfile(path):
            raise ValueError(
                f"feature store {path!r} does not exist: give the .npz / .safetensors file of features or an "
                f"extract-features output folder"
            )
        store = LoadedFeatureStore(load_feature_store(path), path)
        logger.info(f"feature store {path}: {len(store)} keys")
        return store, path
    if isinstance(feature_store, Mapping) or all(
        hasattr(feature_store, name) for name in ("__contains__", "__getitem__", "keys")
    ):
        return feature_store, getattr(feature_store, "output_dir", None)
    raise ValueError(
        "feature_store must be a .npz / .safetensors path, an extract-features folder or a mapping key -> features, "
        f"got {type(feature_store).__name__}"
    )


def describe_store(path: str | None) -> str:
    return f"the feature store {path!r}" if path else "the feature store (given in memory)"


def resolved_path(reference: str, image_root: str | None) -> str:
    """Where a file reference points: relative paths are relative to `image_root` (as `resolve_visual` reads them)."""
    return os.path.join(image_root, reference) if image_root and not os.path.isabs(reference) else reference


def unresolvable_references(
    images: Sequence[Any], feature_store: Mapping[str, Any] | None, image_root: str | None
) -> list[int]:
    """Rows whose string / `datasets.Image` path reference is neither a feature-store key nor an existing file."""
    bad = []
    for row, image in enumerate(images):
        if isinstance(image, Mapping) and ("bytes" in image or "path" in image):  # datasets.Image(decode=False) cell
            if image.get("bytes") or image.get("path") is None:
                continue
            image = image["path"]
        if isinstance(image, os.PathLike):
            image = os.fspath(image)
        if not isinstance(image, str):
            continue
        if feature_store is not None and image in feature_store:
            continue
        if not os.path.isfile(resolved_path(image, image_root)):
            bad.append(row)
    return bad


def check_image_references(
    ids: Sequence[str],
    images: Sequence[Any] | None,
    feature_store: Mapping[str, Any] | None,
    store_path: str | None,
    image_root: str | None,
    what: str = "passages",
) -> None:
    """Raise a ValueError naming a few rows and references that resolve to neither a store key nor a file."""
    if images is None:
        return
    bad = unresolvable_references(images, feature_store, image_root)
    if not bad:
        return
    shown = ", ".join(f"{ids[r]}: {_reference(images[r])!r}" for r in bad[:5])
    where = f" under image_root {image_root!r}" if image_root else ""
    if feature_store is not None:
        examples = ", ".join(repr(k) for k in list(feature_store.keys())[:3])
        raise ValueError(
            f"{len(bad)} {what} reference images that are neither keys of {describe_store(store_path)} nor existing "
            f"files{where}, e.g. {shown}. The store has {len(feature_store)} keys (e.g. {examples}): check that the "
            f"image column holds its keys, or pass the store the features were extracted into"
        )
    raise ValueError(
        f"{len(bad)} {what} reference image files that do not exist{where}, e.g. {shown}: fix the paths, pass "
        f"--image_root, or pass --feature_store if these are keys of precomputed features"
    )


def _reference(image: Any) -> Any:
    return image.get("path") if isinstance(image, Mapping) else image


def referenced_store_keys(images: Sequence[Any] | None, feature_store: Mapping[str, Any] | None) -> list[str]:
    """The distinct feature-store keys among `images`, sorted."""
    if images is None or feature_store is None:
        return []
    return sorted({image for image in images if isinstance(image, str) and image in feature_store})


def feature_store_fingerprint(feature_store: Mapping[str, Any], keys: Sequence[str]) -> str:
    """sha256 over each key's name and its arrays' dtype, shape and bytes: changes when any referenced feature does."""
    digest = hashlib.sha256(f"{len(keys)};".encode())
    for key in keys:
        entry = feature_store[key]
        arrays = (
            (entry.get("visual_feats"), entry.get("visual_pos")) if isinstance(entry, Mapping) else (entry, None)
        )
        digest.update(f"{len(key)}:{key};".encode())
        for array in arrays:
            if array is None:
                digest.update(b"none;")
                continue
            array = np.ascontiguousarray(np.asarray(array))
            digest.update(f"{array.dtype.str}:{array.shape};".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


__all__ = [
    "LoadedFeatureStore",
    "open_feature_store",
    "check_image_references",
    "referenced_store_keys",
    "feature_store_fingerprint",
    "unresolvable_references",
]
