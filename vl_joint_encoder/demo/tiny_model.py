"""The demo's small joint encoder: a locally trained VL-T5-layout tokenizer, a tiny *frozen, random* CLIP vision
tower, and T5 blocks on top (or, with `TinyModelSize(backbone="bart")`, a VL-BART-layout tokenizer and BART layers),
sized to train in a few minutes on a laptop CPU.

Why a random frozen tower can work: CLIP's first step is a linear projection of each pixel patch (a random projection
keeps colours and edges apart), followed by a position embedding and a layer norm; with `vision_feature_layer=0` the
visual tokens are exactly these per-patch features (the hidden states before any transformer layer), so what the
joint encoder sees of a patch is an invertible-enough code of its pixels, and the trained T5 blocks learn the rest
(which colours and shapes make an entity, whatever their position). The tower stays frozen, as VL-Adapter keeps CLIP.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TinyModelSize:
    """Sizes of the demo model; the defaults are what `vl-joint-encoder demo` uses."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden_size: int = 64
    vision_layers: int = 1
    vision_feature_layer: int = 0
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 400
    dropout_rate: float = 0.0
    backbone: str = "t5"  # "bart": VL-BART's encoder layers and a BART-layout tokenizer


def build_tiny_model(texts: Iterable[str], size: TinyModelSize = TinyModelSize(), seed: int = 0):
    """
    (model, processor): a `JointEncoderModel` with a frozen CLIP tower (random weights, built from a config: no
    download) and a `JointEncoderProcessor` whose tokenizer was trained on `texts` (the KB and training questions).
    Deterministic given `texts`, `size` and `seed`.
    """
    from transformers import CLIPVisionConfig

    from ..configuration_joint_encoder import JointEncoderConfig
    from ..modeling_joint_encoder import JointEncoderModel
    from ..processing_joint_encoder import JointEncoderProcessor
    from ..tokenization_joint_encoder import train_vl_bart_tokenizer, train_vl_t5_tokenizer

    if size.backbone == "bart":
        tokenizer = train_vl_bart_tokenizer(texts, vocab_size=size.vocab_size)
        backbone_kwargs = dict(backbone="bart", max_position_embeddings=128)
    else:
        tokenizer = train_vl_t5_tokenizer(texts, vocab_size=size.vocab_size)
        backbone_kwargs = dict(relative_attention_num_buckets=16, relative_attention_max_distance=32)
    vision_config = CLIPVisionConfig(
        hidden_size=size.vision_hidden_size,
        intermediate_size=2 * size.vision_hidden_size,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=2,
        image_size=size.image_size,
        patch_size=size.patch_size,
    )
    config = JointEncoderConfig(
        vocab_size=len(tokenizer),
        d_model=size.d_model,
        d_kv=size.d_model // size.num_heads,
        d_ff=2 * size.d_model,
        num_layers=size.num_layers,
        num_heads=size.num_heads,
        dropout_rate=size.dropout_rate,
        feat_dim=size.vision_hidden_size,
        n_images=1,
        vision_config=vision_config,
        vision_feature_layer=size.vision_feature_layer,
        pooling="mean",
        similarity="cosine",
        logit_scale=20.0,
        **backbone_kwargs,
    )
    torch.manual_seed(seed)
    model = JointEncoderModel(config)
    processor = JointEncoderProcessor.from_model_config(config, tokenizer)
    return model, processor


__all__ = ["TinyModelSize", "build_tiny_model"]
