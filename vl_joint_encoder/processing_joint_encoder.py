"""Processor of the joint encoder: VL-T5 / VL-BART tokenizer + CLIP image processor (PIL backend), or precomputed
features, fed as the original loaders feed the original encoders (task prefix, pad masking, box normalisation and
check).

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

from .configuration_joint_encoder import check_transformers_version


check_transformers_version()  # remote code may load this file first: the same clear error as the model files


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
    if vision_config.model_type == "clip_resnet_vision_model":  # OpenAI's or VL-Adapter's preprocessing
        from .clip_resnet import clip_image_processor_kwargs

        return default_image_processor(**clip_image_processor_kwargs(vision_config.preprocessing, vision_config.resolution))
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


# VL-T5's loaders (j-min/VL-T5 `src/vqa_data.py` 163-171 and every *_data.py): boxes divided by the image size, then
# `np.testing.assert_array_less(boxes, 1 + 1e-5)`, `np.testing.assert_array_less(-boxes, 0 + 1e-5)`, then
# `boxes.clamp_(0.0, 1.0)`. Both comparisons are strict and, with the originals' numpy 1.x (value-based casting),
# done in float32, the boxes' dtype.
BOX_TOLERANCE = 1e-5


def normalize_boxes(
    boxes: np.ndarray,
    image_size: tuple[float, float] | None,
    tolerance: float = BOX_TOLERANCE,
    where: str = "boxes",
    clamp: bool = False,
) -> np.ndarray:
    """
    (V, 4) boxes (x1, y1, x2, y2) in pixels of an image of `image_size` = (width, height) -> [0, 1] float32, as VL-T5's
    loaders compute them: x / width and y / height rounded to float32 (the originals divide float32 arrays in place),
    every coordinate checked to lie strictly within (-tolerance, 1 + tolerance) in float32 (the originals'
    `assert_array_less`, tolerance 1e-5), then clipped to [0, 1]. With `image_size=None` the boxes must already be
    normalised. A coordinate outside raises a ValueError naming `where` (the image) and the box, since it means a wrong
    image_size (e.g. (height, width) swapped) or boxes of another image; `clamp=True` clips it to [0, 1] instead.
    Boxes with x2 < x1 or y2 < y1 raise too (another box layout, e.g. (x, y, w, h)); the originals do not check that.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where} must be (num_boxes, 4) as (x1, y1, x2, y2), got shape {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise ValueError(f"{where} hold NaN or infinite coordinates")
    pixels = boxes
    if image_size is not None:
        if len(image_size) != 2 or not all(float(s) > 0 for s in image_size):
            raise ValueError(f"image_size for {where} must be (width, height) > 0, got {image_size!r}")
        width, height = float(image_size[0]), float(image_size[1])
        # float64 division rounded once to float32 = the originals' float32 division, for float32 pixel boxes and
        # integer sizes (a correctly rounded quotient either way)
        boxes = boxes / np.array([width, height, width, height])
    normalised = boxes.astype(np.float32)  # (V, 4)
    if (normalised[:, 2] < normalised[:, 0]).any() or (normalised[:, 3] < normalised[:, 1]).any():
        bad = int(np.flatnonzero((normalised[:, 2] < normalised[:, 0]) | (normalised[:, 3] < normalised[:, 1]))[0])
        raise ValueError(
            f"{where}: box {bad} {tuple(pixels[bad].tolist())} has x2 < x1 or y2 < y1; boxes must be (x1, y1, x2, y2), "
            f"not (x, y, w, h) or (y1, x1, ...)"
        )
    limit = np.float32(tolerance)
    inside = (normalised < np.float32(1.0 + tolerance)) & (-normalised < limit)
    if not inside.all() and not clamp:
        bad = int(np.flatnonzero(~inside.all(axis=1))[0])
        unit = f"the image of size (width, height) = {tuple(image_size)}" if image_size is not None else "[0, 1]"
        raise ValueError(
            f"{where}: box {bad} {tuple(pixels[bad].tolist())} (normalised {tuple(normalised[bad].tolist())}) lies "
            f"outside {unit}, beyond the original loaders' tolerance ({tolerance:g} of the image size): check that "
            f"image_size is (width, height) of the image the boxes were detected on"
            + ("" if image_size is not None else ", or pass image_size for pixel boxes")
            + ", or pass clamp_boxes=True to clip them to [0, 1]"
        )
    return np.clip(normalised, np.float32(0.0), np.float32(1.0))


def text_inputs(
    tokenizer: Any,
    texts: Sequence[str],
    text_prefix: str | None = None,
    mask_pad_tokens: bool = True,
    as_arrays: bool = False,
    **tokenizer_kwargs,
) -> dict[str, Any]:
    """
    Token ids and attention mask of `texts`, as the original loaders and encoders build them: the task prefix
    prepended to each text (`f"vqa: {question}"`, j-min/VL-T5 `src/vqa_data.py:182`) and the mask derived from the ids,
    `input_ids != pad_token_id` (the originals pass no mask; their encoders compute it, `modeling_t5.py` /
    `modeling_bart.py` `JointEncoder.forward`), so a literal `<pad>` in a text is masked out as there.
    `mask_pad_tokens=False` keeps the tokenizer's own mask instead (1 on every non-padding token). THE text encoding
    of the processor and of the package's batch builder.

    Lists of ids by default; `as_arrays=True` (a padded batch) returns int64 numpy arrays, the mask computed by one
    comparison (what tensors are made from: 0.2 ms a passage less than Python lists of 256 tokens).
    """
    texts = list(texts)
    if text_prefix:
        texts = [text_prefix + text for text in texts]
    if as_arrays:
        tokenizer_kwargs["return_tensors"] = "np"
    encoded = tokenizer(texts, **tokenizer_kwargs)
    input_ids = encoded["input_ids"]
    if not mask_pad_tokens:
        return {"input_ids": input_ids, "attention_mask": encoded["attention_mask"]}
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError(f"{type(tokenizer).__name__} has no pad token: the attention mask is derived from pad ids")
    if as_arrays:
        return {"input_ids": input_ids, "attention_mask": (input_ids != pad).astype(input_ids.dtype)}
    return {"input_ids": input_ids, "attention_mask": [[int(token != pad) for token in row] for row in input_ids]}


def visual_feature_inputs(
    visual_feats: Sequence[Any],
    boxes: Sequence[Any] | None = None,
    image_size: Sequence[Any] | None = None,
    batch_size: int | None = None,
    feat_dim: int | None = None,
    n_images: int | None = None,
    box_tolerance: float = BOX_TOLERANCE,
    sources: Sequence[str | None] | None = None,
    clamp_boxes: bool = False,
) -> dict[str, np.ndarray]:
    """
    Precomputed features of a batch -> padded model inputs: THE padding of visual tokens, used by the processor and
    by the package's batch builder (`data.inputs`). One entry per query: an array (V, C), a list of arrays (one
    per image), or None; `boxes` / `image_size` alike. Every array is checked (2-D, finite, `feat_dim` features per
    token, one box per token, normalised and checked by `normalize_boxes` with `box_tolerance` / `clamp_boxes`).
    `sources` names each query's features in error messages (e.g. the feature-store key); default `visual_feats[q]`.

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
                                    where.replace("visual_feats", "boxes"), clamp=clamp_boxes)
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
    Tokenizer (VL-T5 or VL-BART layout, see `vl_joint_encoder.tokenization_joint_encoder`) + CLIP image processor (PIL
    backend, no torchvision). It feeds the model what the original loaders fed the original encoder.

    Args:
        image_processor: a transformers image processor; defaults to `CLIPImageProcessorPil()` (224 px, CLIP mean/std).
        tokenizer: the model's tokenizer (`len(tokenizer)` must equal the model's `vocab_size`).
        feat_dim (`int`, *optional*): checked against precomputed `visual_feats` (the model's `config.feat_dim`).
        n_images (`int`, *optional*): most images per query (the model's `config.n_images`).
        box_tolerance (`float`, defaults to 1e-5): normalised box coordinates must lie strictly within
            (-tolerance, 1 + tolerance), as the original loaders assert; then they are clipped to [0, 1].
        clamp_boxes (`bool`, defaults to False): clip boxes outside the tolerance to [0, 1] instead of raising.
        text_prefix (`str`, *optional*): the source task's prefix (the model's `config.text_prefix`, e.g. `"vqa: "`),
            prepended to every text: the originals encode `f"vqa: {question}"`. Passages get it too when they go
            through this processor; turn it off with `add_text_prefix=False`.
        add_text_prefix (`bool`, defaults to True): whether `text_prefix` is applied (also a call argument).
        mask_pad_tokens (`bool`, defaults to True): the attention mask is `input_ids != pad_token_id`, as the original
            encoders derive it (the original loaders pass no mask), so a literal `<pad>` in a text is masked out;
            False keeps the tokenizer's mask (1 there).

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
    >>> processor = JointEncoderProcessor.from_model_config(model.config, tokenizer)  # feat_dim, n_images, prefix
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
        box_tolerance: float = BOX_TOLERANCE,
        clamp_boxes: bool = False,
        text_prefix: str | None = None,
        add_text_prefix: bool = True,
        mask_pad_tokens: bool = True,
        **kwargs,
    ):
        if image_processor is None:
            image_processor = default_image_processor()
        if tokenizer is None:
            raise ValueError("JointEncoderProcessor needs the model's tokenizer (see vl_joint_encoder.tokenization_joint_encoder)")
        if text_prefix is not None and not isinstance(text_prefix, str):
            raise ValueError(f"text_prefix must be a string (e.g. 'vqa: ') or None, got {type(text_prefix).__name__}")
        self.feat_dim = feat_dim
        self.n_images = n_images
        self.box_tolerance = float(box_tolerance)
        self.clamp_boxes = bool(clamp_boxes)
        self.text_prefix = text_prefix
        self.add_text_prefix = bool(add_text_prefix)
        self.mask_pad_tokens = bool(mask_pad_tokens)
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
        add_text_prefix: bool | None = None,
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
            data.update(
                self.encode_text(texts, padding=padding, truncation=truncation, max_length=max_length,
                                 add_text_prefix=add_text_prefix, **tokenizer_kwargs)
            )
            batch_size = len(texts)
        if images is not None:
            if not isinstance(images, (list, tuple)):
                images = [images]
            data.update(self._process_images(list(images), batch_size, image_processor_kwargs or {}))
        if visual_feats is not None:
            data.update(self._process_features(visual_feats, boxes, image_size, batch_size))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def encode_text(
        self, texts: Sequence[str], add_text_prefix: bool | None = None, return_tensors: str | None = None, **kwargs
    ) -> BatchFeature:
        """`input_ids` and `attention_mask` of `texts` (prefix and pad masking as configured, see `text_inputs`);
        `kwargs` go to the tokenizer (padding, truncation, max_length, ...)."""
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings")
        use_prefix = self.add_text_prefix if add_text_prefix is None else add_text_prefix
        encoded = text_inputs(
            self.tokenizer, texts, text_prefix=self.text_prefix if use_prefix else None,
            mask_pad_tokens=self.mask_pad_tokens, as_arrays=return_tensors is not None, **kwargs,
        )
        return BatchFeature(data=encoded, tensor_type=return_tensors)

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
            visual_feats, boxes, image_size, batch_size, self.feat_dim, self.n_images, self.box_tolerance,
            clamp_boxes=self.clamp_boxes,
        )

    # ------------------------------------------------------------------------------------------ pass-throughs
    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @classmethod
    def from_model_config(cls, config, tokenizer, image_processor=None, **kwargs) -> JointEncoderProcessor:
        """A processor whose checks match `config` (feat_dim, n_images), applying its `text_prefix`, and, with a vision
        tower, at its image size."""
        if image_processor is None and getattr(config, "vision_config", None) is not None:
            image_processor = image_processor_for_config(config)
        kwargs.setdefault("text_prefix", getattr(config, "text_prefix", None))
        return cls(image_processor, tokenizer, feat_dim=config.feat_dim, n_images=config.n_images, **kwargs)


def _is_pil(image: Any) -> bool:
    return hasattr(image, "mode") and hasattr(image, "convert")


__all__ = [
    "BOX_TOLERANCE",
    "JointEncoderProcessor",
    "default_image_processor",
    "image_processor_for_config",
    "normalize_boxes",
    "text_inputs",
    "visual_feature_inputs",
]
