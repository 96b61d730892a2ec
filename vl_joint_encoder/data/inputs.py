"""Texts + image references -> model inputs: THE batch builder of training, KB encoding, search and evaluation.

`JointEncoderInputBuilder` turns one side of a batch (queries or passages) into what `JointEncoderModel.forward`
takes. Image files and PIL images go through a `JointEncoderProcessor` (the model then has a vision tower);
precomputed features (feature-store keys, feature files, inline arrays) are padded by the processor's own
`visual_feature_inputs`, and texts are encoded by the processor's `text_inputs` (task prefix, `input_ids != pad` mask),
so that the package's batches and `processor(text=..., visual_feats=...)` are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import BatchFeature

from ..processing_joint_encoder import text_inputs, visual_feature_inputs
from .feature_stores import (
    FeatureStore,
    check_store_against_expected,
    check_visual_features,
    describe_store,
    open_feature_store,
)
from .references import resolve_visual


class JointEncoderInputBuilder:
    """
    Args:
        processing_class: a `JointEncoderProcessor` (needed for image files / PIL images) or the model's tokenizer.
        max_length: truncation length in tokens.
        feature_store: precomputed features by key (anything `open_feature_store` accepts).
        image_root: folder that relative image paths are relative to.
        feat_dim: checked against precomputed features (default: the processor's).
        use_images: False drops every image (text-only ablation).
        expected_features: the checkpoint's `config.visual_features` (which features it was trained on: kind,
            backbone, tokens per image, dim, boxes); precomputed features that do not fit are refused with a message
            naming the store, the key and the command that makes the right ones (`data.feature_stores`).
        n_images: images per query the model takes (the token-count check allows up to this many images).

    `builder(texts, images)` -> dict of tensors (`input_ids`, `attention_mask`, and `pixel_values` /
    `pixel_attention_mask` or `visual_feats` / `visual_pos` / `visual_attention_mask` / order ids).
    """

    def __init__(
        self,
        processing_class: Any,
        max_length: int,
        feature_store: Any = None,
        image_root: str | None = None,
        feat_dim: int | None = None,
        use_images: bool = True,
        expected_features: Any = None,
        n_images: int = 1,
    ):
        self.processing_class = processing_class
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.max_length = max_length
        self.feature_store: FeatureStore | None = open_feature_store(feature_store)
        self.image_root = image_root
        self.feat_dim = feat_dim if feat_dim is not None else getattr(processing_class, "feat_dim", None)
        self.use_images = use_images
        self.expected_features = dict(expected_features) if expected_features else None
        self.n_images = n_images
        check_store_against_expected(self.feature_store, self.expected_features)

    def __call__(self, texts: Sequence[str], images: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
        texts = list(texts)
        resolved = [None] * len(texts)
        if self.use_images and images is not None:
            resolved = [resolve_visual(value, self.feature_store, self.image_root) for value in images]
        kinds = {item[0] for item in resolved if item is not None}
        if len(kinds) > 1:
            raise ValueError("a batch mixes image files and precomputed features: use one kind for all queries/passages")
        if kinds == {"image"}:
            if self.processing_class is self.tokenizer:
                raise ValueError(
                    "images were given as files/PIL but only a plain tokenizer, no JointEncoderProcessor: pass the "
                    "processor (processing_class / --processor; the model needs a vision tower), or give precomputed "
                    "features (a feature store)"
                )
            pil = [item[1] if item is not None else None for item in resolved]
            return dict(
                self.processing_class(
                    text=texts, images=pil, return_tensors="pt", padding=True, truncation=True,
                    max_length=self.max_length,
                )
            )
        # the processor's text encoding (task prefix, pad masking); a bare tokenizer gets the pad masking only
        text_kwargs = dict(padding=True, truncation=True, max_length=self.max_length)
        if hasattr(self.processing_class, "encode_text"):
            encoded = self.processing_class.encode_text(texts, return_tensors="pt", **text_kwargs)
        else:
            encoded = BatchFeature(text_inputs(self.tokenizer, texts, as_arrays=True, **text_kwargs), tensor_type="pt")
        inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if kinds == {"features"}:
            features = [item[1] if item is not None else None for item in resolved]
            if self.expected_features:
                for row, entry in enumerate(features):
                    if entry is not None:
                        where = f"{describe_store(self.feature_store)}, {entry.get('source') or f'row {row}'}"
                        check_visual_features(entry, self.expected_features, where, self.n_images)
            padded = visual_feature_inputs(
                [f["visual_feats"] if f is not None else None for f in features],
                boxes=[f.get("visual_pos") if f is not None else None for f in features],
                feat_dim=self.feat_dim,
                sources=[f.get("source") if f is not None else None for f in features],
            )
            inputs.update({name: torch.from_numpy(array) for name, array in padded.items()})
        return inputs


__all__ = ["JointEncoderInputBuilder"]
