"""The frozen vision tower: tiny configs for tests/demos, and attaching a CLIP (or SigLIP) checkpoint to a joint encoder.

`attach_vision_tower(model, "openai/clip-vit-base-patch32")` returns a joint encoder whose config carries the tower's
`vision_config` and whose `vision_model` holds the checkpoint's weights, frozen; saving it (with a processor from
`processor_for_tower`) puts the whole pipeline, image -> CLIP grid -> joint encoder -> embedding, in one repo.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, CLIPVisionConfig, PreTrainedConfig, SiglipVisionConfig
from transformers.utils import logging

from .configuration_joint_encoder import JointEncoderConfig
from .modeling_joint_encoder import JointEncoderModel


logger = logging.get_logger(__name__)

# checkpoint model_type -> (vision config attribute or None, vision model class name in transformers)
_TOWERS = {
    "clip": ("vision_config", "CLIPVisionModel"),
    "clip_vision_model": (None, "CLIPVisionModel"),
    "siglip": ("vision_config", "SiglipVisionModel"),
    "siglip_vision_model": (None, "SiglipVisionModel"),
}


_TINY_TOWER = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8
)


def tiny_clip_vision_config(**kwargs) -> CLIPVisionConfig:
    """A transformers-test-sized CLIP vision tower (image 32, patch 8: a 4 x 4 grid + CLS) for tests and demos;
    keyword arguments override any `CLIPVisionConfig` field."""
    values = {**_TINY_TOWER, **kwargs}
    return CLIPVisionConfig(**{"projection_dim": values["hidden_size"], **values})


def tiny_siglip_vision_config(**kwargs) -> SiglipVisionConfig:
    """A tiny SigLIP vision tower: patch tokens only (no CLS token), attention-pooled head."""
    return SiglipVisionConfig(**{**_TINY_TOWER, **kwargs})


def tiny_clip_resnet_config(**kwargs):
    """A tiny OpenAI-CLIP ModifiedResNet (one block per stage, width 8: 256-d grid tokens, 7 x 7 grid at 224 px,
    VL-Adapter's preprocessing) for tests and demos; keyword arguments override any `CLIPResNetVisionConfig` field."""
    from .clip_resnet import CLIPResNetVisionConfig

    values = {"layers": (1, 1, 1, 1), "width": 8, "image_size": 224, "output_dim": 24, "heads": 4,
              "preprocessing": "vl_adapter", **kwargs}
    return CLIPResNetVisionConfig(**values)


def clip_resnet_checkpoint_kind(checkpoint: str | os.PathLike) -> str | None:
    """'openai' for an OpenAI `RN*.pt` file (or a `.pt` / `.bin` state dict), 'folder' for a saved
    `CLIPResNetVisionModel`, None for anything else (a transformers checkpoint or hub id)."""
    import json

    path = os.fspath(checkpoint)
    if os.path.isfile(path) and path.endswith((".pt", ".pth", ".bin")):
        return "openai"
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            try:
                model_type = json.load(f).get("model_type")
            except ValueError:
                return None
        return "folder" if model_type == "clip_resnet_vision_model" else None
    return None


def load_clip_resnet_tower(checkpoint: str | os.PathLike, **overrides) -> torch.nn.Module:
    """A `CLIPResNetVisionModel` from an OpenAI `RN*.pt` file (TorchScript archive or state dict; sizes read off the
    weights; `overrides` such as `preprocessing="vl_adapter", input_size=224` set the config's other fields) or from a
    saved `CLIPResNetVisionModel` folder."""
    from .clip_resnet import CLIPResNetVisionModel, load_openai_checkpoint

    kind = clip_resnet_checkpoint_kind(checkpoint)
    if kind == "openai":
        tower = load_openai_checkpoint(checkpoint)
        given = {name: value for name, value in overrides.items() if value is not None}
        if given.get("preprocessing") == "vl_adapter":
            given.setdefault("input_size", 224)  # VL-Adapter's coco_CLIP.py feeds every ResNet at 224 px
        if given:
            config = tower.config.to_dict()
            for key in ("model_type", "transformers_version", "auto_map", "architectures"):
                config.pop(key, None)
            tower.config = type(tower.config)(**{**config, **given})  # validated; the weights' sizes are unchanged
        return tower.eval()
    if kind == "folder":
        tower = CLIPResNetVisionModel.from_pretrained(checkpoint)
        for name, value in overrides.items():
            if value is not None and getattr(tower.config, name) != value:
                raise ValueError(
                    f"{checkpoint} is saved with {name}={getattr(tower.config, name)!r}; {value!r} would not be the "
                    f"features it was saved for: drop the option (or save the tower with it)"
                )
        return tower.eval()
    raise ValueError(f"{checkpoint} is neither an OpenAI CLIP ResNet .pt file nor a saved CLIPResNetVisionModel")


def load_vision_tower(checkpoint: str | os.PathLike, **from_pretrained_kwargs) -> torch.nn.Module:
    """
    The vision half of a CLIP / SigLIP checkpoint (a full `CLIPModel`/`SiglipModel` or a bare vision model, local dir
    or hub id), as a `CLIPVisionModel` / `SiglipVisionModel`. Both layouts store the tower under `vision_model.`, so
    the full model's text weights are simply not read. An OpenAI CLIP ResNet (`RN101.pt`) or a saved
    `CLIPResNetVisionModel` folder gives a `CLIPResNetVisionModel` (`load_clip_resnet_tower`).
    """
    import transformers

    if clip_resnet_checkpoint_kind(checkpoint) is not None:
        return load_clip_resnet_tower(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint, **from_pretrained_kwargs)
    if config.model_type not in _TOWERS:
        raise ValueError(
            f"{checkpoint!s} is a {config.model_type!r} checkpoint; attach_vision_tower supports {sorted(_TOWERS)} "
            f"(CLIP or SigLIP, full model or vision model), an OpenAI CLIP ResNet RN*.pt file or a saved "
            f"CLIPResNetVisionModel folder"
        )
    attribute, class_name = _TOWERS[config.model_type]
    vision_config = getattr(config, attribute) if attribute else config
    model_class = getattr(transformers, class_name)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a full CLIPModel's text weights are expected to be left out: no loading table
    try:
        tower, info = model_class.from_pretrained(
            checkpoint, config=vision_config, output_loading_info=True, **from_pretrained_kwargs
        )
    finally:
        logging.set_verbosity(verbosity)
    logger.info("%s: vision tower loaded, %d other weights (text side) left out", checkpoint, len(info["unexpected_keys"]))
    if info["missing_keys"]:
        raise ValueError(
            f"{checkpoint!s} lacks {len(info['missing_keys'])} weights of its vision tower, e.g. "
            f"{sorted(info['missing_keys'])[:3]}: not a complete {class_name} checkpoint"
        )
    return tower


def attach_vision_tower(
    model_or_dir: JointEncoderModel | str | os.PathLike,
    vision_checkpoint: str | os.PathLike | torch.nn.Module,
    vision_feature_layer: int | None = None,
    vision_feature_select: str | None = None,
    vision_grid_pool_size: int | None = None,
    vision_box_mode: str | None = None,
    vision_tower_dtype: str | None = None,
    reinit_feat_embedding: bool = False,
) -> JointEncoderModel:
    """
    A copy of the joint encoder that holds a frozen vision tower with the weights of `vision_checkpoint`.

    Args:
        model_or_dir: a `JointEncoderModel` (converted VL-T5 or T5-initialised) or its directory / hub id.
        vision_checkpoint: CLIP or SigLIP checkpoint (full or vision-only; local dir or hub id), or a loaded
            `CLIPVisionModel` / `SiglipVisionModel`.
        vision_feature_layer / vision_feature_select / vision_grid_pool_size / vision_box_mode / vision_tower_dtype:
            override the config's values (see `JointEncoderConfig`); `None` keeps them.
        reinit_feat_embedding: the visual projection is `Linear(feat_dim, d_model)`; if the tower's hidden size differs
            from `feat_dim` (e.g. a model trained on 2048-d Faster R-CNN features and a 768-d ViT), this must be True
            to start a new, T5-initialised projection (the model then needs training). Otherwise that is an error.

    Returns a new `JointEncoderModel` (eval mode); every non-vision weight equals the input model's.
    """
    model = model_or_dir if isinstance(model_or_dir, JointEncoderModel) else JointEncoderModel.from_pretrained(
        model_or_dir
    )
    tower = vision_checkpoint if isinstance(vision_checkpoint, torch.nn.Module) else load_vision_tower(
        vision_checkpoint
    )
    vision_config: PreTrainedConfig = tower.config
    hidden = vision_config.hidden_size
    config_dict = model.config.to_dict()
    if hidden != model.config.feat_dim:
        if not reinit_feat_embedding:
            raise ValueError(
                f"the vision tower's hidden size is {hidden} but the joint encoder was built for feat_dim="
                f"{model.config.feat_dim} features: use a tower of that size, or pass reinit_feat_embedding=True "
                f"to start a new visual projection (which then needs training)"
            )
        logger.warning("feat_dim %d -> %d: the visual feature projection is re-initialised", model.config.feat_dim, hidden)
    config_dict["feat_dim"] = hidden
    config_dict["vision_config"] = vision_config.to_dict()
    for name, value in (
        ("vision_feature_layer", vision_feature_layer),
        ("vision_feature_select", vision_feature_select),
        ("vision_grid_pool_size", vision_grid_pool_size),
        ("vision_box_mode", vision_box_mode),
        ("vision_tower_dtype", vision_tower_dtype),
    ):
        if value is not None:
            config_dict[name] = value
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        config_dict.pop(key, None)
    # the converter's record of the precomputed features the checkpoint was trained on: the tower now makes them
    if config_dict.pop("visual_features", None):
        logger.info("the tower replaces the checkpoint's precomputed visual features (config.visual_features dropped)")
    new_config = JointEncoderConfig(**config_dict)
    new_config._attn_implementation = model.config._attn_implementation
    new_model = JointEncoderModel(new_config)

    state = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_model.")}
    if hidden != model.config.feat_dim:
        state = {k: v for k, v in state.items() if not k.startswith("visual_embedding.feat_embedding.0.")}
    missing, unexpected = new_model.load_state_dict(state, strict=False)
    allowed = ("vision_model.", "visual_embedding.feat_embedding.0.") if hidden != model.config.feat_dim else (
        "vision_model.",
    )
    wrong = [k for k in missing if not k.startswith(allowed)]
    if wrong or unexpected:
        raise RuntimeError(f"joint encoder weights did not transfer: missing {wrong[:5]}, unexpected {unexpected[:5]}")
    tower_state = tower.state_dict()
    missing, unexpected = new_model.vision_model.load_state_dict(tower_state, strict=True)
    n_tower = sum(1 for k in new_model.state_dict() if k.startswith("vision_model."))
    if n_tower != len(tower_state):
        raise RuntimeError(f"the tower has {len(tower_state)} tensors but the joint encoder holds {n_tower}")
    new_model.to(next(model.parameters()).dtype)
    if vision_tower_dtype is not None or new_config.vision_tower_dtype is not None:
        new_model.vision_model.to(getattr(torch, new_config.vision_tower_dtype))
    new_model.freeze_vision_model()
    logger.info("attached a %s (%d tensors) to the joint encoder", type(tower).__name__, len(tower_state))
    return new_model.eval()


def processor_for_tower(model: JointEncoderModel, tokenizer, vision_checkpoint: str | os.PathLike | None = None):
    """
    The `JointEncoderProcessor` for a model with a tower: the checkpoint's own image preprocessing
    (`preprocessor_config.json`, read with the PIL backend) when given and present, else CLIP's (SigLIP's) defaults at
    the tower's image size.
    """
    from transformers import AutoImageProcessor

    from .processing_joint_encoder import JointEncoderProcessor

    image_processor = None
    if vision_checkpoint is not None and clip_resnet_checkpoint_kind(vision_checkpoint) is None:
        try:
            image_processor = AutoImageProcessor.from_pretrained(vision_checkpoint, backend="pil")
        except OSError:
            logger.info("%s has no preprocessor_config.json: CLIP defaults at the tower's image size", vision_checkpoint)
    return JointEncoderProcessor.from_model_config(model.config, tokenizer, image_processor=image_processor)


__all__ = [
    "attach_vision_tower",
    "clip_resnet_checkpoint_kind",
    "load_clip_resnet_tower",
    "load_vision_tower",
    "processor_for_tower",
    "tiny_clip_resnet_config",
    "tiny_clip_vision_config",
    "tiny_siglip_vision_config",
]
