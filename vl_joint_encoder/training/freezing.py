"""Which parameters train: the vision tower never; optionally not the token embeddings, the first N blocks, or
everything but the visual embedding + adapters (VL-Adapter) or the projection head.

VL-Adapter (Sung et al., CVPR 2022, https://arxiv.org/abs/2112.06825, sec. 3-4) freezes the CLIP tower and the
language model and trains the adapters, the visual projection (our `visual_embedding`) and the layer norms.
"""

from __future__ import annotations

from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)

TRAIN_ONLY_CHOICES = ("adapters", "projection")


def _encoders(model: nn.Module) -> list[nn.Module]:
    """The JointEncoderModel(s) inside `model` (one for a shared tower, two for separate towers)."""
    from ..modeling_joint_encoder import JointEncoderModel

    if isinstance(model, JointEncoderModel):
        return [model]
    found = [module for module in model.modules() if isinstance(module, JointEncoderModel)]
    if not found:
        raise ValueError(f"{type(model).__name__} holds no JointEncoderModel: cannot apply freezing options")
    return found


def apply_freezing(
    model: nn.Module,
    freeze_token_embeddings: bool = False,
    freeze_first_n_blocks: int = 0,
    train_only: str | None = None,
) -> dict[str, int]:
    """
    Set `requires_grad` on the joint encoder(s) of `model`. Returns {"trainable": n, "frozen": n} parameter counts.

    Args:
        freeze_token_embeddings: freeze `shared` (the token embedding; its last rows are also the object-order
            embedding of visual tokens, so those freeze too).
        freeze_first_n_blocks: freeze the first N encoder blocks, T5 blocks or BART layers (and the token embedding
            below them when N > 0 is combined with `freeze_token_embeddings`).
        train_only: `"adapters"` trains only adapters + visual embedding + layer norms (VL-Adapter; needs
            `config.adapter_reduction_factor`) and the projection head if any; `"projection"` trains only the
            projection head (needs `config.projection_dim`).

    The vision tower (`vision_model`) stays frozen whatever the options.
    """
    if train_only is not None and train_only not in TRAIN_ONLY_CHOICES:
        raise ValueError(f"train_only must be one of {TRAIN_ONLY_CHOICES} or None, got {train_only!r}")
    if isinstance(freeze_first_n_blocks, bool) or not isinstance(freeze_first_n_blocks, int) or freeze_first_n_blocks < 0:
        raise ValueError(f"freeze_first_n_blocks must be an integer >= 0, got {freeze_first_n_blocks!r}")
    for encoder in _encoders(model):
        config = encoder.config
        if freeze_first_n_blocks > config.num_layers:
            raise ValueError(f"freeze_first_n_blocks={freeze_first_n_blocks} but the model has {config.num_layers} blocks")
        if train_only == "adapters" and config.adapter_reduction_factor is None:
            raise ValueError(
                "train_only='adapters' needs a model with adapters: set adapter_reduction_factor in its config "
                "(VL-Adapter uses 8 or 16)"
            )
        if train_only == "projection" and encoder.projection is None:
            raise ValueError("train_only='projection' needs a projection head: set projection_dim in the model config")
        if train_only is not None:
            encoder.requires_grad_(False)
            if train_only == "adapters":
                encoder.visual_embedding.requires_grad_(True)
                for name, module in encoder.named_modules():
                    if name.endswith(("adapter", "layer_norm", "layernorm_embedding")):  # BART's embedding norm too
                        module.requires_grad_(True)
            if encoder.projection is not None:
                encoder.projection.requires_grad_(True)
        if freeze_token_embeddings:
            encoder.shared.requires_grad_(False)
        for block in encoder.encoder_blocks[:freeze_first_n_blocks]:
            block.requires_grad_(False)
        encoder.freeze_vision_model()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    if trainable == 0:
        raise ValueError("the freezing options leave no parameter to train")
    logger.info(f"parameters: {trainable:,} trainable, {frozen:,} frozen")
    return {"trainable": trainable, "frozen": frozen}


__all__ = ["apply_freezing", "TRAIN_ONLY_CHOICES"]
