"""The OpenAI CLIP ModifiedResNet image tower (RN50, RN101, RN50x4, RN50x16, RN50x64) as a transformers model.

This module imports only torch, transformers, numpy and PIL, so it can ship as remote code next to a saved model
(`CLIPResNetVisionModel.save_pretrained` copies it there; `AutoModel.from_pretrained(folder, trust_remote_code=True)`
loads it back).

Architecture (openai/CLIP `clip/model.py`, `ModifiedResNet`):

- a stem of three 3x3 convolutions (the first with stride 2; widths width/2, width/2, width), each with BatchNorm and
  ReLU, then a 2x2 average pool (instead of torchvision's single 7x7 convolution and max pool);
- four stages of Bottleneck blocks (1x1, 3x3, 1x1 convolutions, expansion 4) with anti-aliased striding: a block of
  stride s > 1 average-pools (kernel s) after its 3x3 convolution, and its shortcut is AvgPool(s) -> 1x1 conv -> BN;
- an attention pool: the layer4 grid (N, C, g, g), flattened to g*g tokens with their mean prepended, plus a learned
  positional embedding (g*g + 1, C), goes through one multi-head attention layer whose only query is the mean token;
  `c_proj` maps it to `output_dim` (the CLIP embedding size).

The state-dict keys of `CLIPResNetVisionModel` are exactly the OpenAI ones (`visual.conv1.weight`,
`visual.layer1.0.downsample.0.weight`, `visual.attnpool.positional_embedding`, ...), so an OpenAI or open_clip
checkpoint loads with `load_openai_state_dict` after one strict key check; timm's `resnet*_clip` layout converts with
`convert_timm_state_dict`.

Outputs: `last_hidden_state` is the layer4 grid as tokens (N, g*g, width*32), row-major (token index = row * g + col,
the order of VL-Adapter's `permute(1, 2, 0).reshape(49, -1)`); `pooler_output` is the attention-pool output
(N, output_dim), i.e. CLIP's `encode_image`; `hidden_states` (with `output_hidden_states=True`) are the stem and the
four stage outputs, each as tokens (N, h*w, C) in the same row-major order, so `hidden_states[-1]` is
`last_hidden_state`.

Preprocessing (PIL + numpy, no torchvision), bit-exact to torchvision's PIL path on the same Pillow:
`clip_preprocess` is OpenAI's `_transform(n_px)` (Resize(n_px, bicubic) of the shortest edge, CenterCrop(n_px), RGB,
ToTensor, Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)); `vl_adapter_preprocess` is ylsung/VL_adapter
`feature_extraction/coco_CLIP.py` (convert("RGB") first, Resize((224, 224)) bicubic -- a squash, no aspect ratio
kept --, CenterCrop a no-op, ToTensor, then the same mean/std).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSING_MODES = ("clip", "vl_adapter")

# openai/CLIP `clip/clip.py` _MODELS and `build_model` (open_clip `model_configs/RN*.json` agree):
# output_dim is CLIP's joint embedding size (text_projection.shape[1]); heads = width * 32 // 64.
CLIP_RESNET_PRESETS: dict[str, dict] = {
    "RN50": {"layers": (3, 4, 6, 3), "width": 64, "image_size": 224, "output_dim": 1024},
    "RN101": {"layers": (3, 4, 23, 3), "width": 64, "image_size": 224, "output_dim": 512},
    "RN50x4": {"layers": (4, 6, 10, 6), "width": 80, "image_size": 288, "output_dim": 640},
    "RN50x16": {"layers": (6, 8, 18, 8), "width": 96, "image_size": 384, "output_dim": 768},
    "RN50x64": {"layers": (3, 15, 36, 10), "width": 128, "image_size": 448, "output_dim": 1024},
}


class CLIPResNetVisionConfig(PreTrainedConfig):
    """
    Config of the OpenAI CLIP ModifiedResNet image tower.

    Args:
        layers (`tuple[int, int, int, int]`): Bottleneck blocks per stage (RN50: (3, 4, 6, 3)).
        width (`int`): stem width; stage i has width * 2**i planes and width * 2**i * 4 output channels, so the
            layer4 grid has `hidden_size = width * 32` channels (RN50/RN101: 2048, RN50x4: 2560).
        image_size (`int`): the input resolution the attention pool's positional embedding is sized for; the
            grid is `image_size // 32` squared (224 -> 7 x 7).
        output_dim (`int`): attention-pool output size, CLIP's embedding size (RN50: 1024, RN101: 512).
        heads (`int`, *optional*): attention-pool heads; default `width * 32 // 64` as in OpenAI's CLIP.
        num_channels (`int`): input channels (3).
        batch_norm_eps (`float`): BatchNorm epsilon (torch's default 1e-5, as OpenAI's).
        initializer_range (`float`): std of the attention-pool projections is `hidden_size ** -0.5` (OpenAI);
            this scales it (1.0 = OpenAI's initialisation).
        preprocessing (`str`): how images become `pixel_values` for this tower: `"clip"` (OpenAI's `_transform`:
            shortest edge + center crop; ViQuAE's `clip-RN50`) or `"vl_adapter"` (VL-Adapter's `coco_CLIP.py`:
            RGB, squash to a square). Read by the extractor and by the joint encoder's processor.
        input_size (`int`, *optional*): the resolution images are preprocessed to (default `image_size`).
            VL-Adapter feeds every ResNet, RN50x4 included, at 224 px: `input_size=224` then gives RN50x4 a 7 x 7
            grid; the attention pool's positional embedding is then resized (bicubic; only `pooler_output` uses it).
    """

    model_type = "clip_resnet_vision_model"

    def __init__(
        self,
        layers: Iterable[int] = (3, 4, 6, 3),
        width: int = 64,
        image_size: int = 224,
        output_dim: int = 1024,
        heads: int | None = None,
        num_channels: int = 3,
        batch_norm_eps: float = 1e-5,
        initializer_range: float = 1.0,
        preprocessing: str = "clip",
        input_size: int | None = None,
        **kwargs,
    ):
        layers = [int(n) for n in layers]
        if preprocessing not in PREPROCESSING_MODES:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING_MODES}, got {preprocessing!r}")
        if input_size is not None and (input_size < 32 or input_size % 32):
            raise ValueError(f"input_size must be a positive multiple of 32 (the tower's total stride), got {input_size}")
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts (one per stage), got {layers}")
        if width < 2 or width % 2:
            raise ValueError(f"width must be an even integer >= 2 (the stem's first convolutions have width // 2), got {width}")
        if image_size < 32 or image_size % 32:
            raise ValueError(f"image_size must be a positive multiple of 32 (the tower's total stride), got {image_size}")
        if heads is None:
            heads = width * 32 // 64
        if heads < 1 or (width * 32) % heads:
            raise ValueError(f"heads={heads} must divide the grid width width * 32 = {width * 32}")
        self.layers = layers
        self.width = int(width)
        self.image_size = int(image_size)
        self.output_dim = int(output_dim)
        self.heads = int(heads)
        self.num_channels = int(num_channels)
        self.batch_norm_eps = float(batch_norm_eps)
        self.initializer_range = float(initializer_range)
        self.preprocessing = preprocessing
        self.input_size = None if input_size is None or int(input_size) == self.image_size else int(input_size)
        super().__init__(**kwargs)

    @property
    def num_hidden_layers(self) -> int:
        """Stages after the stem: `hidden_states` has this + 1 entries (stem, layer1..layer4)."""
        return 4

    @property
    def resolution(self) -> int:
        """The side images are preprocessed to: `input_size`, else `image_size`."""
        return self.input_size or self.image_size

    @property
    def output_grid_size(self) -> int:
        """Side of the layer4 grid at `resolution` (VL-Adapter: 7)."""
        return self.resolution // 32

    @property
    def hidden_size(self) -> int:
        """Channels of the layer4 grid tokens (`last_hidden_state`): width * 32."""
        return self.width * 32

    @property
    def grid_size(self) -> int:
        """Side of the layer4 grid at `image_size` (224 -> 7)."""
        return self.image_size // 32

    @classmethod
    def from_preset(cls, name: str, **overrides) -> CLIPResNetVisionConfig:
        """`CLIPResNetVisionConfig.from_preset("RN101")`: the OpenAI model's sizes (see `CLIP_RESNET_PRESETS`)."""
        if name not in CLIP_RESNET_PRESETS:
            raise ValueError(f"unknown CLIP ResNet preset {name!r}; known: {sorted(CLIP_RESNET_PRESETS)}")
        return cls(**{**CLIP_RESNET_PRESETS[name], **overrides})

    @classmethod
    def vl_adapter(cls, name: str = "RN101", **overrides) -> CLIPResNetVisionConfig:
        """The tower as ylsung/VL_adapter `feature_extraction/coco_CLIP.py` runs it: preset `name`, VL-Adapter's
        preprocessing (RGB, bicubic squash to 224 x 224) at 224 px for every model (RN50x4 too: a 7 x 7 grid)."""
        return cls.from_preset(name, **{"preprocessing": "vl_adapter", "input_size": 224, **overrides})


class CLIPResNetBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, eps: float = 1e-5):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, eps=eps)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=eps)
        # anti-aliased striding: every convolution has stride 1, an average pool does the downsampling
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, eps=eps)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # key names "-1" (no weights), "0", "1" as in OpenAI's checkpoints
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion, eps=eps)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class CLIPResNetAttentionPool(nn.Module):
    def __init__(self, grid_size: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.grid_size = grid_size
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.randn(grid_size**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def _positions(self, height: int, width: int, interpolate: bool) -> torch.Tensor:
        pos = self.positional_embedding
        if (height, width) == (self.grid_size, self.grid_size):
            return pos
        if not interpolate:
            raise ValueError(
                f"the layer4 grid is {height} x {width} but the attention pool's positional embedding is for "
                f"{self.grid_size} x {self.grid_size} (image_size {self.grid_size * 32}): resize the images to "
                f"{self.grid_size * 32} px or pass interpolate_pos_encoding=True"
            )
        grid = pos[1:].reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(height, width), mode="bicubic", align_corners=False).to(pos.dtype)
        return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(height * width, -1)], dim=0)

    def forward(self, grid: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch, channels, height, width = grid.shape
        tokens = grid.flatten(2).transpose(1, 2)  # (N, h*w, C), row-major
        sequence = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (N, 1 + h*w, C)
        sequence = sequence + self._positions(height, width, interpolate_pos_encoding).to(sequence.dtype)
        head_dim = channels // self.num_heads

        def split(x):  # (N, L, C) -> (N, heads, L, head_dim)
            return x.reshape(batch, x.shape[1], self.num_heads, head_dim).transpose(1, 2)

        query = split(self.q_proj(sequence[:, :1]))  # the mean token is the only query
        key, value = split(self.k_proj(sequence)), split(self.v_proj(sequence))
        weights = torch.softmax((query * head_dim**-0.5) @ key.transpose(-1, -2), dim=-1)  # (N, heads, 1, L)
        pooled = (weights @ value).transpose(1, 2).reshape(batch, channels)
        return self.c_proj(pooled)


class CLIPResNetTower(nn.Module):
    """OpenAI's `ModifiedResNet`, same attribute (state-dict) names."""

    def __init__(self, config: CLIPResNetVisionConfig):
        super().__init__()
        width, eps = config.width, config.batch_norm_eps
        self.conv1 = nn.Conv2d(config.num_channels, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2, eps=eps)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2, eps=eps)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width, eps=eps)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for index, blocks in enumerate(config.layers):
            planes = width * 2**index
            stage = [CLIPResNetBottleneck(inplanes, planes, 1 if index == 0 else 2, eps)]
            inplanes = planes * CLIPResNetBottleneck.expansion
            stage += [CLIPResNetBottleneck(inplanes, planes, 1, eps) for _ in range(1, blocks)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
        self.attnpool = CLIPResNetAttentionPool(config.grid_size, width * 32, config.heads, config.output_dim)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.avgpool(x)


def _as_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    return feature_map.flatten(2).transpose(1, 2)  # (N, C, h, w) -> (N, h*w, C), row-major


class CLIPResNetPreTrainedModel(PreTrainedModel):
    config_class = CLIPResNetVisionConfig
    config: CLIPResNetVisionConfig
    base_model_prefix = "clip_resnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    _no_split_modules = ["CLIPResNetBottleneck"]

    def _init_weights(self, module):
        """OpenAI's `CLIP.initialize_parameters` for the ResNet tower (bn3 of every block zeroed), torch defaults
        (Kaiming-uniform convolutions, unit BatchNorm) elsewhere."""
        from transformers import initialization as init

        if isinstance(module, CLIPResNetAttentionPool):
            std = self.config.initializer_range * module.c_proj.in_features**-0.5
            init.normal_(module.positional_embedding, std=module.positional_embedding.shape[1] ** -0.5)
            for projection in (module.q_proj, module.k_proj, module.v_proj, module.c_proj):
                init.normal_(projection.weight, std=std)
                init.zeros_(projection.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        if isinstance(module, CLIPResNetBottleneck):
            init.zeros_(module.bn3.weight)


class CLIPResNetVisionModel(CLIPResNetPreTrainedModel):
    """
    The CLIP ModifiedResNet image tower. Its state-dict keys are OpenAI's full-CLIP ones (`visual.*`).

    `forward(pixel_values)` -> `last_hidden_state` (N, g*g, width*32): the layer4 grid as row-major tokens (the
    VL-Adapter "att" features); `pooler_output` (N, output_dim): the attention pool (CLIP's image embedding, not
    L2-normalised); `hidden_states` (if asked): (stem, layer1, ..., layer4), each (N, h*w, C) row-major.
    """

    def __init__(self, config: CLIPResNetVisionConfig):
        super().__init__(config)
        self.visual = CLIPResNetTower(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.config.num_channels}, height, width), got {tuple(pixel_values.shape)}"
            )
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if interpolate_pos_encoding is None:  # a config with input_size != image_size is meant to run at input_size
            interpolate_pos_encoding = self.config.input_size is not None
        tower = self.visual
        x = pixel_values.to(tower.conv1.weight.dtype)
        x = tower.stem(x)
        stages = [x]
        for index in range(1, 5):
            x = getattr(tower, f"layer{index}")(x)
            stages.append(x)
        pooled = tower.attnpool(x, interpolate_pos_encoding=interpolate_pos_encoding)
        last_hidden_state = _as_tokens(x)
        hidden_states = tuple(_as_tokens(s) for s in stages) if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (last_hidden_state, pooled, hidden_states) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last_hidden_state, pooler_output=pooled, hidden_states=hidden_states
        )

    @property
    def grid_size(self) -> int:
        return self.config.grid_size


CLIPResNetVisionConfig.register_for_auto_class()
CLIPResNetVisionModel.register_for_auto_class("AutoModel")


# --------------------------------------------------------------------------------------------------------------
# Checkpoint loading: OpenAI / open_clip layout (`visual.*`), timm's `resnet*_clip` layout


def _state_dict_of(source) -> Mapping[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return source
    if hasattr(source, "state_dict"):  # nn.Module or torch.jit.ScriptModule (OpenAI's .pt archives)
        return source.state_dict()
    raise TypeError(f"expected a state dict or a module, got {type(source).__name__}")


def _visual_part(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    visual = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not visual:
        sample = sorted(state_dict)[:5]
        raise ValueError(
            f"no key starts with {prefix!r} (first keys: {sample}); for a bare ModifiedResNet state dict pass "
            f"prefix='', for timm's resnet*_clip use convert_timm_state_dict first"
        )
    if "proj" in visual or "class_embedding" in visual or any(k.startswith("transformer.") for k in visual):
        raise ValueError(
            f"the {prefix!r} keys are a CLIP ViT image tower (proj / class_embedding / transformer.*), not a "
            f"ModifiedResNet: load it with transformers' CLIPVisionModel"
        )
    return visual


def config_from_openai_state_dict(source, prefix: str = "visual.", **overrides) -> CLIPResNetVisionConfig:
    """Sizes read off an OpenAI-layout state dict, as openai/CLIP's `build_model` does."""
    visual = _visual_part(_state_dict_of(source), prefix)
    required = ("layer1.0.conv1.weight", "attnpool.positional_embedding", "attnpool.c_proj.weight", "conv1.weight")
    missing = [prefix + key for key in required if key not in visual]
    if missing:
        raise ValueError(f"not a CLIP ModifiedResNet state dict: missing {missing}")
    layers = []
    for stage in range(1, 5):
        blocks = {key.split(".")[1] for key in visual if key.startswith(f"layer{stage}.")}
        if not blocks:
            raise ValueError(f"not a CLIP ModifiedResNet state dict: no {prefix}layer{stage}.* key")
        layers.append(len(blocks))
    positions = visual["attnpool.positional_embedding"].shape[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise ValueError(f"{prefix}attnpool.positional_embedding has {positions} rows, not grid**2 + 1")
    width = visual["layer1.0.conv1.weight"].shape[0]
    sizes = {
        "layers": layers,
        "width": width,
        "image_size": grid * 32,
        "output_dim": visual["attnpool.c_proj.weight"].shape[0],
        "heads": width * 32 // 64,
        "num_channels": visual["conv1.weight"].shape[1],
    }
    return CLIPResNetVisionConfig(**{**sizes, **overrides})


def load_openai_state_dict(
    model: CLIPResNetVisionModel, source, prefix: str = "visual.", allow_missing_batch_counters: bool = True
) -> dict:
    """
    Copy an OpenAI-layout state dict (openai/CLIP `.pt` archive's `state_dict()`, open_clip's CLIP `state_dict()`,
    or a bare `ModifiedResNet` with `prefix=""`) into `model`, strictly: every tensor under `prefix` must be one of
    the model's and of the same shape, and every tensor of the model must be given (BatchNorm `num_batches_tracked`
    counters excepted when `allow_missing_batch_counters`: some conversions drop them and inference does not use
    them). Keys outside `prefix` (the text tower, `logit_scale`, ...) are ignored and counted. Weights are cast to
    the model's dtype (OpenAI's archives are fp16). Returns a report dict; raises `ValueError` naming the offending
    keys otherwise.
    """
    state_dict = _state_dict_of(source)
    visual = _visual_part(state_dict, prefix)
    own = model.visual.state_dict()
    missing = sorted(set(own) - set(visual))
    if allow_missing_batch_counters:
        missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    unexpected = sorted(set(visual) - set(own))
    mismatched = [
        f"{prefix}{key}: checkpoint {tuple(visual[key].shape)} vs model {tuple(own[key].shape)}"
        for key in sorted(set(visual) & set(own))
        if tuple(visual[key].shape) != tuple(own[key].shape)
    ]
    if missing or unexpected or mismatched:
        def show(keys):
            keys = [k if k.startswith(prefix) or ":" in k else prefix + k for k in keys]
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

        problems = []
        if missing:
            problems.append(f"missing {len(missing)} key(s): {show(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} key(s): {show(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch(es): {show(mismatched)}")
        raise ValueError(
            "the checkpoint does not fit this CLIPResNetVisionModel "
            f"(layers={model.config.layers}, width={model.config.width}, image_size={model.config.image_size}, "
            f"output_dim={model.config.output_dim}): " + "; ".join(problems)
            + " (config_from_openai_state_dict reads the right sizes off the checkpoint)"
        )
    dtype = model.visual.conv1.weight.dtype
    with torch.no_grad():
        for key, tensor in own.items():
            if key in visual:
                value = visual[key].detach().to(device=tensor.device)
                tensor.copy_(value if not tensor.is_floating_point() else value.to(dtype))
    source_dtypes = sorted({str(v.dtype).replace("torch.", "") for v in visual.values() if v.is_floating_point()})
    return {
        "loaded": len(visual),
        "ignored_outside_prefix": len(state_dict) - len(visual),
        "missing_batch_counters": len(set(own) - set(visual)),
        "source_dtypes": source_dtypes,
    }


def from_openai_state_dict(source, prefix: str = "visual.", dtype: torch.dtype = torch.float32, **overrides):
    """A `CLIPResNetVisionModel` sized from and filled with an OpenAI-layout state dict (see `load_openai_state_dict`)."""
    config = config_from_openai_state_dict(source, prefix, **overrides)
    model = CLIPResNetVisionModel(config).to(dtype).eval()
    load_openai_state_dict(model, source, prefix)
    return model


def load_openai_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> CLIPResNetVisionModel:
    """An openai/CLIP `RN*.pt` file (a TorchScript archive; a plain state-dict file works too) -> our model, fp32 by
    default. No download: the file must be on disk."""
    path = os.fspath(path)
    try:
        archive = torch.jit.load(path, map_location="cpu")
        state_dict = archive.state_dict()
    except RuntimeError:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("input_resolution", "context_length", "vocab_size"):  # TorchScript scalars, not weights
        if isinstance(state_dict, dict):
            state_dict.pop(key, None)
    return from_openai_state_dict(state_dict, dtype=dtype)


def convert_timm_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """timm `byobnet` `resnet*_clip` keys (`stem.conv1.conv.weight`, `stages.0.0.conv1_1x1.bn.weight`,
    `stages.0.0.shortcut.conv.conv.weight`, `head.pos_embed`, `head.q.weight`, `head.proj.weight`) -> OpenAI keys (the
    inverse of timm's `_convert_openai_clip`). Raises on a key it cannot place (e.g. a fused `head.qkv`)."""
    import re

    out = {}
    convs = {"conv1_1x1": "1", "conv2_kxk": "2", "conv3_1x1": "3"}
    head = {"pos_embed": "positional_embedding", "q": "q_proj", "k": "k_proj", "v": "v_proj", "proj": "c_proj"}
    for key, value in state_dict.items():
        match = re.fullmatch(r"stem\.conv([123])\.(conv|bn)\.(.+)", key)
        if match:
            out[f"{prefix}{match[2]}{match[1]}.{match[3]}"] = value
            continue
        match = re.fullmatch(r"stages\.(\d+)\.(\d+)\.(conv[123]_(?:1x1|kxk))\.(conv|bn)\.(.+)", key)
        if match:
            stage, block, conv, kind, rest = match.groups()
            out[f"{prefix}layer{int(stage) + 1}.{block}.{kind}{convs[conv]}.{rest}"] = value
            continue
        match = re.fullmatch(r"stages\.(\d+)\.(\d+)\.shortcut\.conv\.(conv|bn)\.(.+)", key)
        if match:
            stage, block, kind, rest = match.groups()
            out[f"{prefix}layer{int(stage) + 1}.{block}.downsample.{0 if kind == 'conv' else 1}.{rest}"] = value
            continue
        match = re.fullmatch(r"head\.(pos_embed|q|k|v|proj)(?:\.(weight|bias))?", key)
        if match:
            out[f"{prefix}attnpool.{head[match[1]]}" + (f".{match[2]}" if match[2] else "")] = value
            continue
        raise ValueError(f"timm key {key!r} has no place in the OpenAI ModifiedResNet layout")
    return out


# --------------------------------------------------------------------------------------------------------------
# Preprocessing, PIL + numpy (bit-exact to torchvision's PIL path with the same Pillow)


def _pil():
    from PIL import Image

    return Image


def _as_pil(image):
    Image = _pil()
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return Image.open(image)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"array images must be uint8 (H, W[, 3]), got {array.dtype}")
    return Image.fromarray(array)


def shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision `Resize(size)` (an int): the short edge becomes `size`, the long one `int(size * long / short)`
    (truncated, as torchvision's `_compute_resized_output_size`). Returns (new_width, new_height)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop(image, size: int):
    """torchvision `CenterCrop(size)` on a PIL image: top = int(round((h - size) / 2)), same for left; an image
    smaller than `size` is first zero-padded (left/top get the floor half)."""
    width, height = image.size
    if width < size or height < size:
        Image = _pil()
        pad_left, pad_top = (size - width) // 2 if size > width else 0, (size - height) // 2 if size > height else 0
        canvas = Image.new(image.mode, (max(width, size), max(height, size)))
        canvas.paste(image, (pad_left, pad_top))
        image, (width, height) = canvas, canvas.size
        if (width, height) == (size, size):
            return image
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def normalize_image(image, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> np.ndarray:
    """torchvision `ToTensor` + `Normalize` on an RGB PIL image: float32 (3, H, W), x / 255 then (x - mean) / std,
    each step rounded to float32 as torch does."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {array.shape}")
    pixels = array.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return ((pixels - mean) / std).astype(np.float32)


def clip_preprocess(image, image_size: int = 224) -> np.ndarray:
    """openai/CLIP `_transform(image_size)` (also open_clip's eval transform, resize_mode 'shortest', and ViQuAE's
    `clip-RN50` vectors): Resize(image_size, bicubic) of the shortest edge, CenterCrop, convert("RGB"), ToTensor,
    Normalize. Returns float32 (3, image_size, image_size)."""
    image = _as_pil(image)
    Image = _pil()
    image = image.resize(shortest_edge_size(*image.size, image_size), Image.Resampling.BICUBIC)
    image = center_crop(image, image_size).convert("RGB")
    return normalize_image(image)


def vl_adapter_preprocess(image, image_size: int = 224) -> np.ndarray:
    """ylsung/VL_adapter `feature_extraction/coco_CLIP.py`: Image.open(...).convert("RGB"), then
    Resize((224, 224), bicubic) -- both sides to 224, the aspect ratio is not kept --, CenterCrop((224, 224)) (a no-op),
    ToTensor, then `-= mean; /= std` with OpenAI's mean/std. Returns float32 (3, image_size, image_size)."""
    image = _as_pil(image).convert("RGB")
    Image = _pil()
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return normalize_image(image)


PREPROCESSORS = {"clip": clip_preprocess, "vl_adapter": vl_adapter_preprocess}


def pixel_values_for(images, mode: str = "vl_adapter", image_size: int = 224) -> torch.Tensor:
    """A batch of images (PIL, paths or uint8 arrays) -> float32 pixel_values (N, 3, S, S) with `mode` 'vl_adapter'
    (squash, the VL-Adapter grids) or 'clip' (shortest edge + center crop, OpenAI / open_clip / ViQuAE)."""
    if mode not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessing mode {mode!r}; known: {sorted(PREPROCESSORS)}")
    if not isinstance(images, (list, tuple)):
        images = [images]
    return torch.from_numpy(np.stack([PREPROCESSORS[mode](image, image_size) for image in images]))


def pixel_values_for_config(images, config: CLIPResNetVisionConfig) -> torch.Tensor:
    """`pixel_values_for` with the config's `preprocessing` and `resolution` (what the tower was meant to see)."""
    return pixel_values_for(images, config.preprocessing, config.resolution)


def clip_image_processor_kwargs(mode: str = "vl_adapter", image_size: int = 224) -> dict:
    """Keyword arguments of transformers' `CLIPImageProcessor` closest to `mode` (for a processor saved next to a
    model). It is not bit-exact to the functions above: see docs/visual_features.md for the measured difference."""
    common = {
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
        "resample": 3,  # PIL bicubic
    }
    if mode == "clip":
        return {**common, "do_resize": True, "size": {"shortest_edge": image_size}, "do_center_crop": True,
                "crop_size": {"height": image_size, "width": image_size}}
    if mode == "vl_adapter":
        return {**common, "do_resize": True, "size": {"height": image_size, "width": image_size},
                "do_center_crop": False}
    raise ValueError(f"unknown preprocessing mode {mode!r}; known: {sorted(PREPROCESSORS)}")


def vl_adapter_downsample(tokens: torch.Tensor, output_size: int = 6) -> torch.Tensor:
    """VL-Adapter `--downsample` (VL-T5/src/modeling_bart.py `Downsample`, used by modeling_t5's JointEncoder with
    n_boxes 36): (N, g*g, C) row-major tokens -> AdaptiveMaxPool2d((6, 6)) -> (N, 36, C). For 7 -> 6 each output cell
    is the max over a 2 x 2 window with stride 1."""
    batch, length, channels = tokens.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"{length} tokens are not a square grid")
    grid = tokens.transpose(1, 2).reshape(batch, channels, side, side)
    pooled = F.adaptive_max_pool2d(grid, (output_size, output_size))
    return pooled.reshape(batch, channels, -1).transpose(1, 2)


__all__ = [
    "CLIP_RESNET_PRESETS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PREPROCESSING_MODES",
    "CLIPResNetVisionConfig",
    "CLIPResNetVisionModel",
    "center_crop",
    "clip_image_processor_kwargs",
    "clip_preprocess",
    "config_from_openai_state_dict",
    "convert_timm_state_dict",
    "from_openai_state_dict",
    "load_openai_checkpoint",
    "load_openai_state_dict",
    "normalize_image",
    "pixel_values_for",
    "pixel_values_for_config",
    "shortest_edge_size",
    "vl_adapter_downsample",
    "vl_adapter_preprocess",
]
