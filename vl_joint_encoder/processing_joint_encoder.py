"""Processor of the joint encoder: VL-T5 tokenizer + CLIP image processor (PIL backend), or precomputed features.

`processor(text=..., images=...)` gives what the frozen vision tower takes (`pixel_values` (B, n, 3, H, W) and
`pixel_attention_mask` (B, n)); `processor(text=..., visual_feats=..., boxes=..., image_size=...)` gives what
precomputed features need (`visual_feats`, `visual_pos` normalised to [0, 1], `visual_attention_mask`,
`image_order_ids`, `object_order_ids`), as LXMERT's / VL-T5's data loaders build them. `model(**batch)` takes either
output as is.

This file imports only transformers, numpy and torch (and PIL through transformers) so that `save_pretrained` can copy
it next to the model as remote code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import BatchFeature, ProcessorMixin
from transformers.utils import logging


logger = logging.get_logger(__name__)

IMAGE_PROCESSOR_BACKEND = "CLIPImageProcessorPil"


def default_image_processor(**kwargs):
    """CLIP's image processor on the PIL backend (CLIPImageProcessor needs torchvision for its default backend)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**kwargs)


def image_processor_for_config(config):
    """The default image processor (PIL backend) for a joint encoder config's vision tower, at its image size."""
    vision_config = config.vision_config
    size = vision_config.image_size
    if vision_config.model_type.startswith("siglip"):
        from transformers import SiglipImageProcessorPil  # SigLIP: plain resize to a square, mean = std = 0.5

        return SiglipImageProcessorPil(size={"height": size, "width": size})
    return default_image_processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _as_array(value: Any, what: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().float().cpu().numpy()
    try:
        return np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} is not a numeric array ({error})") from None


def _per_query(value: Any, batch_size: int, name: str) -> list:
    """One entry per query; `value` may be a list of per-query entries, or None for all."""
    if value is None:
        return [None] * batch_size
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list with one entry per query, got {type(value).__name__}")
    if len(value) != batch_size:
        raise ValueError(f"{name} has {len(value)} entries but there are {batch_size} queries: give one per query")
    return list(value)


def normalize_boxes(
    boxes: np.ndarray, image_size: tuple[float, float] | None, tolerance: float = 0.05, where: str = "boxes"
) -> np.ndarray:
    """
    (V, 4) boxes (x1, y1, x2, y2) in pixels of an image of `image_size` = (width, height) -> [0, 1], clamped.
    With `image_size=None` the boxes must already be normalised. Coordinates outside the image by more than
    `tolerance` (fraction of its size) raise, since they mean a wrong image_size (e.g. (height, width) swapped) or
    boxes of another image; smaller overshoots (detectors often give x2 = width + 1) are clamped, as LXMERT does.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where} must be (num_boxes, 4) as (x1, y1, x2, y2), got shape {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise ValueError(f"{where} hold NaN or infinite coordinates")
    if image_size is not None:
        if len(image_size) != 2 or not all(float(s) > 0 for s in image_size):
            raise ValueError(f"image_size for {where} must be (width, height) > 0, got {image_size!r}")
        width, height = float(image_size[0]), float(image_size[1])
        boxes = boxes / np.array([width, height, width, height])
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        bad = int(np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0])
        raise ValueError(
            f"{where}: box {bad} has x2 < x1 or y2 < y1; boxes must be (x1, y1, x2, y2), not (x, y, w, h) or (y1, x1, ...)"
        )
    if (boxes < -tolerance).any() or (boxes > 1 + tolerance).any():
        bad = int(np.flatnonzero(((boxes < -tolerance) | (boxes > 1 + tolerance)).any(axis=1))[0])
        unit = f"the image of size (width, height) = {tuple(image_size)}" if image_size is not None else "[0, 1]"
        raise ValueError(
            f"{where}: box {bad} lies outside {unit} by more than {tolerance:.0%}: check that image_size is "
            f"(width, height) of the image the boxes were detected on"
            + ("" if image_size is not None else ", or pass image_size for pixel boxes")
        )
    return np.clip(boxes, 0.0, 1.0).astype(np.float32)


def visual_feature_inputs(
    visual_feats: Sequence[Any],
    boxes: Sequence[Any] | None = None,
    image_size: Sequence[Any] | None = None,
    batch_size: int | None = None,
    feat_dim: int | None = None,
    n_images: int | None = None,
    box_tolerance: float = 0.05,
    sources: Sequence[str | None] | None = None,
) -> dict[str, np.ndarray]:
    """
    Precomputed features of a batch -> padded model inputs: THE padding of visual tokens, used by the processor and
    by the package's batch builder (`data.inputs`). One entry per query: an array (V, C), a list of arrays (one
    per image), or None; `boxes` / `image_size` alike. Every array is checked (2-D, finite, `feat_dim` features per
    token, one normalised box per token). `sources` names each query's features in error messages (e.g. the
    feature-store key); default `visual_feats[q]`.

    Returns numpy arrays `visual_feats` (B, V_max, C) float32, `visual_pos` (B, V_max, 4) in [0, 1],
    `visual_attention_mask`, `image_order_ids` (index of the image of each token) and `object_order_ids` (index of
    the token within its image), int64 (B, V_max); an empty dict when no query has features and `feat_dim` is unknown.
    """
    feat_dim_expected = feat_dim
    if not isinstance(visual_feats, (list, tuple)):
        raise ValueError("visual_feats must be a list with one entry per query: an array (V, C), a list, or None")
    batch_size = len(visual_feats) if batch_size is None else batch_size
    feats_q = _per_query(visual_feats, batch_size, "visual_feats")
    boxes_q = _per_query(boxes, batch_size, "boxes")
    sizes_q = _per_query(image_size, batch_size, "image_size")
    rows = []  # per query: list of (feats (V_i, C), boxes (V_i, 4))
    feat_dim = feat_dim_expected
    for q in range(batch_size):
        feats = feats_q[q]
        if feats is None:
            rows.append([])
            continue
        multi = isinstance(feats, (list, tuple)) and not (len(feats) and isinstance(feats[0], (int, float)))
        multi = multi and all(f is None or np.ndim(f) == 2 for f in feats)
        feats_list = list(feats) if multi else [feats]
        n = len(feats_list)
        box_list = _entry_list(boxes_q[q], n, multi, f"boxes[{q}]")
        size_list = _entry_list(sizes_q[q], n, multi, f"image_size[{q}]", sizes=True)
        if n_images is not None and n > n_images:
            raise ValueError(f"query {q} has {n} images but the model takes at most n_images={n_images}")
        images = []
        for i, (f, b, s) in enumerate(zip(feats_list, box_list, size_list)):
            name = sources[q] if sources is not None and sources[q] else f"visual_feats[{q}]"
            where = name + (f"[{i}]" if multi else "")
            f = _as_array(f, where)
            if f.ndim != 2:
                raise ValueError(f"{where} must be (num_tokens, feat_dim), got shape {f.shape}")
            if not np.isfinite(f).all():
                raise ValueError(
                    f"{where} holds {int((~np.isfinite(f)).sum())} NaN/infinite values: the feature file is "
                    f"corrupt or was written from a diverged extractor; re-extract it"
                )
            if feat_dim is None:
                feat_dim = f.shape[1]
            if f.shape[1] != feat_dim:
                raise ValueError(
                    f"{where} has {f.shape[1]} features per token but "
                    + (f"the model expects feat_dim={feat_dim_expected}" if feat_dim_expected else f"others have {feat_dim}")
                    + ": extract features with the backbone the model was trained with"
                )
            if b is None:
                if s is not None:
                    raise ValueError(f"image_size given for {where} but no boxes")
                b = np.zeros((f.shape[0], 4), dtype=np.float32)
            else:
                b = normalize_boxes(_as_array(b, where.replace("visual_feats", "boxes")), s, box_tolerance,
                                    where.replace("visual_feats", "boxes"))
                if b.shape[0] != f.shape[0]:
                    raise ValueError(f"{where} has {f.shape[0]} tokens but its boxes have {b.shape[0]}")
            images.append((f, b))
        rows.append(images)
    most = max((sum(f.shape[0] for f, _ in images) for images in rows), default=0)
    if feat_dim is None:
        if feat_dim_expected is None:
            return {}
        feat_dim = feat_dim_expected
    visual_feats_out = np.zeros((batch_size, most, feat_dim), dtype=np.float32)  # (B, V_max, C)
    visual_pos = np.zeros((batch_size, most, 4), dtype=np.float32)  # (B, V_max, 4)
    visual_attention_mask = np.zeros((batch_size, most), dtype=np.int64)  # (B, V_max)
    image_order_ids = np.zeros((batch_size, most), dtype=np.int64)
    object_order_ids = np.zeros((batch_size, most), dtype=np.int64)
    for q, images in enumerate(rows):
        start = 0
        for i, (f, b) in enumerate(images):
            end = start + f.shape[0]
            visual_feats_out[q, start:end] = f
            visual_pos[q, start:end] = b
            visual_attention_mask[q, start:end] = 1
            image_order_ids[q, start:end] = i
            object_order_ids[q, start:end] = np.arange(f.shape[0])
            start = end
    return {
        "visual_feats": visual_feats_out,
        "visual_pos": visual_pos,
        "visual_attention_mask": visual_attention_mask,
        "image_order_ids": image_order_ids,
        "object_order_ids": object_order_ids,
    }


def _entry_list(entry, n: int, multi: bool, name: str, sizes: bool = False) -> list:
    if entry is None:
        return [None] * n
    if not multi:
        return [entry]
    if not isinstance(entry, (list, tuple)) or len(entry) != n or (sizes and n == 2 and np.ndim(entry[0]) == 0):
        raise ValueError(f"{name} must be a list with one entry per image of the query ({n})")
    return list(entry)


class JointEncoderProcessor(ProcessorMixin):
    r"""
    Tokenizer (VL-T5 layout, see `vl_joint_encoder.tokenization_joint_encoder`) + CLIP image processor (PIL backend, no torchvision).

    Args:
        image_processor: a transformers image processor; defaults to `CLIPImageProcessorPil()` (224 px, CLIP mean/std).
        tokenizer: the model's tokenizer (`len(tokenizer)` must equal the model's `vocab_size`).
        feat_dim (`int`, *optional*): checked against precomputed `visual_feats` (the model's `config.feat_dim`).
        n_images (`int`, *optional*): most images per query (the model's `config.n_images`).
        box_tolerance (`float`, defaults to 0.05): pixel boxes may overshoot the image by this fraction (then clamped).

    Call:
        `processor(text=[...], images=[PIL | path | list[...] | None, ...])` -> `input_ids`, `attention_mask`,
        `pixel_values` (B, n, 3, H, W), `pixel_attention_mask` (B, n), n = most images in one query.
        `processor(text=[...], visual_feats=[(V, C) | list[(V_i, C)] | None, ...], boxes=[(V, 4) | list | None, ...],
        image_size=[(w, h) | list | None, ...])` -> `visual_feats` (B, V_max, C), `visual_pos` (B, V_max, 4) in [0, 1],
        `visual_attention_mask`, `image_order_ids` (index of the image of each token), `object_order_ids` (index
        of the token within its image). Without `image_size` the boxes must already be normalised; without boxes
        they are zeros (VL-Adapter's CLIP grids).

    Example:

    ```python
    >>> processor = JointEncoderProcessor(tokenizer=tokenizer, feat_dim=model.config.feat_dim)
    >>> batch = processor(text=["who built this?"], images=[photo], return_tensors="pt")
    >>> embedding = model(**batch).pooler_output
    ```
    """

    model_input_names = ["input_ids", "attention_mask", "pixel_values", "pixel_attention_mask", "visual_feats",
                         "visual_pos", "visual_attention_mask", "image_order_ids", "object_order_ids"]

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        feat_dim: int | None = None,
        n_images: int | None = None,
        box_tolerance: float = 0.05,
        **kwargs,
    ):
        if image_processor is None:
            image_processor = default_image_processor()
        if tokenizer is None:
            raise ValueError("JointEncoderProcessor needs the model's tokenizer (see vl_joint_encoder.tokenization_joint_encoder)")
        self.feat_dim = feat_dim
        self.n_images = n_images
        self.box_tolerance = float(box_tolerance)
        super().__init__(image_processor, tokenizer, **kwargs)

    # -------------------------------------------------------------------------------------------------- call
    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        visual_feats: Sequence[Any] | None = None,
        boxes: Sequence[Any] | None = None,
        image_size: Sequence[Any] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        truncation: bool = True,
        max_length: int | None = None,
        image_processor_kwargs: dict | None = None,
        **tokenizer_kwargs,
    ) -> BatchFeature:
        if images is not None and visual_feats is not None:
            raise ValueError("give images (for the vision tower) or visual_feats (precomputed), not both")
        if visual_feats is None and (boxes is not None or image_size is not None):
            raise ValueError("boxes / image_size given without visual_feats")
        single = isinstance(text, str)
        texts = [text] if single else (list(text) if text is not None else None)
        if single:
            # one query: `images` is its image or its list of images; `visual_feats` its array or list of arrays
            images = None if images is None else [images]
            visual_feats = None if visual_feats is None else [visual_feats]
            boxes = None if boxes is None else [boxes]
            image_size = None if image_size is None else [image_size]
        if texts is None and images is None and visual_feats is None:
            raise ValueError("give text, images or visual_feats")
        data: dict[str, Any] = {}
        batch_size = None
        if texts is not None:
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a list of strings")
            encoded = self.tokenizer(
                texts, padding=padding, truncation=truncation, max_length=max_length, **tokenizer_kwargs
            )
            data["input_ids"] = encoded["input_ids"]
            data["attention_mask"] = encoded["attention_mask"]
            batch_size = len(texts)
        if images is not None:
            if not isinstance(images, (list, tuple)):
                images = [images]
            data.update(self._process_images(list(images), batch_size, image_processor_kwargs or {}))
        if visual_feats is not None:
            data.update(self._process_features(visual_feats, boxes, image_size, batch_size))
        return BatchFeature(data=data, tensor_type=return_tensors)

    # ------------------------------------------------------------------------------------------------ images
    def _process_images(self, images: list, batch_size: int | None, image_processor_kwargs: dict) -> dict:
        from .images import load_image

        if batch_size is not None and len(images) != batch_size:
            raise ValueError(
                f"images has {len(images)} entries but text has {batch_size}: give one entry per query "
                f"(an image, a list of images, or None)"
            )
        per_query = [[] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry]
                     for entry in images]
        most = max((len(entry) for entry in per_query), default=0)
        if self.n_images is not None and most > self.n_images:
            raise ValueError(f"a query has {most} images but the model takes at most n_images={self.n_images}")
        flat = []
        for q, entry in enumerate(per_query):
            for i, image in enumerate(entry):
                if image is None:
                    raise ValueError(f"images[{q}][{i}] is None: drop it from the list (a query may have no image)")
                # in-memory images keep their size (as CLIPProcessor sees them); files are read with load_image's
                # checks (file name in errors, any mode to RGB, EXIF orientation, huge files downscaled)
                flat.append(load_image(image, max_side=None) if _is_pil(image) else load_image(image))
        if most == 0:
            return {}
        pixels = self.image_processor(images=flat, return_tensors="np", **image_processor_kwargs)["pixel_values"]
        pixels = np.asarray(pixels, dtype=np.float32)  # (N, 3, H, W)
        pixel_values = np.zeros((len(per_query), most, *pixels.shape[1:]), dtype=np.float32)  # (B, n, 3, H, W)
        pixel_attention_mask = np.zeros((len(per_query), most), dtype=np.int64)  # (B, n)
        k = 0
        for q, entry in enumerate(per_query):
            for i in range(len(entry)):
                pixel_values[q, i] = pixels[k]
                pixel_attention_mask[q, i] = 1
                k += 1
        return {"pixel_values": pixel_values, "pixel_attention_mask": pixel_attention_mask}

    # -------------------------------------------------------------------------------------- precomputed features
    def _process_features(self, visual_feats, boxes, image_size, batch_size: int | None) -> dict:
        return visual_feature_inputs(
            visual_feats, boxes, image_size, batch_size, self.feat_dim, self.n_images, self.box_tolerance
        )

    # ------------------------------------------------------------------------------------------ pass-throughs
    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @classmethod
    def from_model_config(cls, config, tokenizer, image_processor=None, **kwargs) -> JointEncoderProcessor:
        """A processor whose checks match `config` (feat_dim, n_images) and, with a vision tower, its image size."""
        if image_processor is None and getattr(config, "vision_config", None) is not None:
            image_processor = image_processor_for_config(config)
        return cls(image_processor, tokenizer, feat_dim=config.feat_dim, n_images=config.n_images, **kwargs)


def _is_pil(image: Any) -> bool:
    return hasattr(image, "mode") and hasattr(image, "convert")


__all__ = [
    "JointEncoderProcessor",
    "default_image_processor",
    "image_processor_for_config",
    "normalize_boxes",
    "visual_feature_inputs",
]
