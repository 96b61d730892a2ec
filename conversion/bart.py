"""The BART side of the converter: a VL-BART / VL-Adapter-BART config read off the state dict, and a plain BART
checkpoint folder loaded (`--source bart`). Spec: docs/vl_bart_encoder_spec.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers.utils import logging

from conversion.key_map import ConversionError, adapter_and_downsample_kwargs, choose_visual_norm_layout
from vl_joint_encoder import JointEncoderConfig


logger = logging.get_logger(__name__)

ENCODER = "model.encoder."
# num_heads is in no tensor shape (BART has no relative-bias table): the facebook/bart-* configs by d_model
BART_HEADS_BY_D_MODEL = {768: 12, 1024: 16}  # bart-base, bart-large
VL_BART_DROPOUT = 0.1  # the trainers set dropout = attention_dropout = activation_dropout = --dropout (0.1)


def bart_num_heads(d_model: int, num_heads: int | None) -> int:
    if num_heads is not None:
        if d_model % num_heads:
            raise ConversionError(f"--num-heads {num_heads} does not divide d_model {d_model}")
        return num_heads
    if d_model not in BART_HEADS_BY_D_MODEL:
        raise ConversionError(
            f"d_model {d_model} is not bart-base's (768, 12 heads) nor bart-large's (1024, 16 heads) and the weights do "
            f"not record the number of heads: give it with --num-heads"
        )
    heads = BART_HEADS_BY_D_MODEL[d_model]
    logger.info(f"num_heads {heads}: the facebook/bart-* value for d_model {d_model} (not readable from the weights)")
    return heads


def infer_bart_config(
    state: dict[str, torch.Tensor],
    adapter_task: str | None,
    downsample: bool,
    visual_norm_layout: str | None = None,
    num_heads: int | None = None,
    scale_embedding: bool = False,
    share_vis_lang_layer_norm: bool = False,
    **extra,
) -> tuple[JointEncoderConfig, str]:
    """(config, visual norm layout) of a prefix-stripped VL-BART / VL-Adapter-BART state dict: every size from the
    shapes (spec: 'What the shapes give'); num_heads, scale_embedding and share_vis_lang_layer_norm from the options
    (bart-base: 12, False, False)."""
    for key in ("model.shared.weight", ENCODER + "embed_positions.weight", ENCODER + "layers.0.fc1.weight",
                ENCODER + "visual_embedding.feat_embedding.0.weight"):
        if key not in state:
            raise ConversionError(f"the checkpoint has no {key!r}: cannot read the encoder's sizes (is it VL-BART?)")
    vocab_size, d_model = state["model.shared.weight"].shape
    vis = ENCODER + "visual_embedding."
    layout = choose_visual_norm_layout(state, visual_norm_layout, ENCODER)
    order = vis + "img_order_embedding.weight" in state
    kwargs = dict(
        backbone="bart",
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=state[ENCODER + "layers.0.fc1.weight"].shape[0],
        num_layers=1 + max(int(k.split(".")[3]) for k in state if k.startswith(ENCODER + "layers.")),
        num_heads=bart_num_heads(d_model, num_heads),
        max_position_embeddings=state[ENCODER + "embed_positions.weight"].shape[0] - 2,
        scale_embedding=scale_embedding,
        share_vis_lang_layer_norm=share_vis_lang_layer_norm,
        dropout_rate=VL_BART_DROPOUT,
        feat_dim=state[vis + "feat_embedding.0.weight"].shape[1],
        n_images=state[vis + "img_order_embedding.weight"].shape[0] if order else 2,
        use_vis_order_embedding=order,
        use_vis_layer_norm=layout != "none",
        individual_vis_layer_norm=layout != "after-sum",
    )
    adapter_key = None
    if adapter_task is not None:
        adapter_key = f"{ENCODER}layers.0.attn_adapter.adapters.{adapter_task}.down_sampler.weight"
    kwargs.update(adapter_and_downsample_kwargs(state, adapter_key, d_model, downsample))
    return JointEncoderConfig(**kwargs, **extra), layout


def load_bart(checkpoint: str | Path, load_state_dict):
    """(state dict in the BartForConditionalGeneration layout `model.*`, BartConfig) of a transformers BART folder or
    hub id. A BartModel's keys (`shared.weight`, `encoder.*`) get the `model.` prefix."""
    from transformers import BartConfig

    directory = Path(checkpoint)
    if not directory.is_dir():
        if directory.exists() or os.sep in str(checkpoint) or str(checkpoint).startswith("."):
            raise ConversionError(
                f"--source bart needs a transformers BART directory or hub id, got {str(checkpoint)!r}"
            )
        from huggingface_hub import snapshot_download

        try:
            directory = Path(snapshot_download(str(checkpoint), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        except Exception as error:
            raise ConversionError(f"cannot find {str(checkpoint)!r} locally nor download it from the Hub: {error}") from error
    try:
        model_type = json.loads((directory / "config.json").read_text()).get("model_type")
        bart_config = BartConfig.from_pretrained(directory)
    except Exception as error:
        raise ConversionError(f"{directory} has no readable BART config.json: {error}") from error
    if model_type != "bart":
        raise ConversionError(f"{directory} holds a {model_type!r} model, not BART")
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"{directory} has no model.safetensors / pytorch_model.bin")
    state = {}
    for file in files:
        state.update(load_state_dict(file))
    if "model.shared.weight" not in state and ("shared.weight" in state or any(k.startswith("encoder.") for k in state)):
        state = {("model." + k if k.split(".")[0] in ("shared", "encoder", "decoder") else k): v for k, v in state.items()}
    if "model.shared.weight" not in state and "model.encoder.embed_tokens.weight" in state:
        state["model.shared.weight"] = state["model.encoder.embed_tokens.weight"]
    return state, bart_config, directory


def check_bart_config(bart_config) -> None:
    """The VL-BART layout needs BART's ids (bos 0, pad 1, eos 2) and its plain post-norm encoder."""
    ids = (bart_config.bos_token_id, bart_config.pad_token_id, bart_config.eos_token_id)
    if ids != (0, 1, 2):
        raise ConversionError(f"the BART config has bos, pad, eos = {ids}; VL-BART's layout needs (0, 1, 2) (bart-base)")
    if getattr(bart_config, "add_final_layer_norm", False) or getattr(bart_config, "normalize_before", False):
        raise ConversionError("the BART config has pre-norm / final layer norms (mBART-style): not the BART encoder")


__all__ = ["bart_num_heads", "check_bart_config", "infer_bart_config", "load_bart"]
