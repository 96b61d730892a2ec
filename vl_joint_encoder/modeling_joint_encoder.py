"""PyTorch VL-T5 / VL-BART joint encoder used as a dense retriever.

The encoder computes exactly what the encoders of VL-T5 and VL-BART (Cho et al., 2021,
https://arxiv.org/abs/2102.02779, j-min/VL-T5 `src/modeling_t5.py`, `src/modeling_bart.py`) and of VL-Adapter (Sung et
al., 2022, https://arxiv.org/abs/2112.06825) compute: text tokens and visual tokens (region or CLIP grid features +
boxes) concatenated, text first, through the backbone's encoder layers:
- `config.backbone == "t5"`: pre-norm T5 blocks with T5's relative position bias on text x text pairs only, a final
  RMS norm (`block`, `final_layer_norm`; spec: shared/docs/vl_t5_encoder_spec.md);
- `config.backbone == "bart"`: learned text positions (offset 2) and `layernorm_embedding` on the text, then post-norm
  BART encoder layers, no final norm (`embed_positions`, `layernorm_embedding`, `layers`; spec:
  docs/vl_bart_encoder_spec.md). On text alone it equals transformers' `BartModel` encoder.
Both backbones live in this one file, selected by a config field, so that every job of the package (processor,
trainer, encoding, search) takes one `JointEncoderModel` class and the remote-code export stays two files. On top sits
a retrieval head (pooling, optional projection, optional L2 normalisation) and the similarity the model is trained
and searched with.

This file imports only its configuration file so that `save_pretrained` can export it as remote code.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .configuration_joint_encoder import JointEncoderConfig


logger = logging.get_logger(__name__)

BART_POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding: ids 0 and 1 of its table are never looked up
# `VL_JOINT_ENCODER_DEBUG=1` (the package's debug switch, `vl_joint_encoder.utils.errors.DEBUG_ENV`: this file is
# remote code and imports nothing of the package) makes `forward` check the values of GPU tensors too.
DEBUG_ENV = "VL_JOINT_ENCODER_DEBUG"


def _check_values(tensor: torch.Tensor) -> bool:
    """Whether value checks run on `tensor`: always for CPU tensors (reading them costs no device synchronisation),
    for GPU tensors only under `VL_JOINT_ENCODER_DEBUG=1` (each check synchronises the device)."""
    if tensor.device.type in ("cpu", "meta"):
        return tensor.device.type == "cpu"
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _require_tensor(name: str, value, kind: str) -> None:
    """`value` must be a torch tensor of `kind` ("integer": token / order ids, "float": features, "mask": 0/1)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor, got {type(value).__name__}: build inputs with the processor / tokenizer "
            f"and return_tensors='pt'"
        )
    dtype = value.dtype
    if kind == "integer" and (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool):
        raise ValueError(f"{name} must hold integer ids (torch.long), got dtype {dtype}: do not cast ids to float")
    if kind == "float" and not dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {dtype}")
    if kind == "mask" and dtype.is_complex:
        raise ValueError(f"{name} must hold 0/1 (or booleans), got dtype {dtype}")


def _check_mask_values(name: str, mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool and mask.numel() and _check_values(mask):
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            raise ValueError(
                f"{name} must hold only 0 (padding) and 1 (token), got {mask[bad].flatten()[0].item()!r}: a mask "
                f"is not a weight"
            )


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.numel() and _check_values(tensor) and not bool(torch.isfinite(tensor).all()):
        bad = (~torch.isfinite(tensor)).nonzero()[0].tolist()
        raise ValueError(
            f"{name} holds NaN or infinite values (first at index {tuple(bad)}): check the feature extraction / the "
            f"feature store"
        )


@dataclass
class JointEncoderOutput(ModelOutput):
    """
    Output of [`JointEncoderModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, text_length + visual_length, d_model)`):
            Encoder output in the VL-T5 order: text tokens first, then visual tokens.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, embedding_dim)`):
            The retrieval embedding: pooled, projected (if `projection_dim`) and L2-normalised (if `normalize`).
        attention_mask (`torch.LongTensor` of shape `(batch_size, text_length + visual_length)`):
            The joint mask used for attention and pooling (1 = real token).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): embedding output, then the output of each block
            (for T5 the last one after the final norm), when `output_hidden_states=True`.
        attentions (`tuple(torch.FloatTensor)`, *optional*): attention probabilities of each block, when
            `output_attentions=True`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    attention_mask: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class JointEncoderLayerNorm(nn.Module):
    """T5's RMS norm: `weight * x / sqrt(mean(x^2) + eps)`, variance in fp32, no bias, no mean subtraction."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class JointEncoderAdapter(nn.Module):
    """Bottleneck adapter of VL-Adapter (Houlsby et al., 2019): `up(act(down(z))) + z`."""

    def __init__(self, config: JointEncoderConfig):
        super().__init__()
        bottleneck = config.d_model // config.adapter_reduction_factor
        self.down_sampler = nn.Linear(config.d_model, bottleneck)
        self.activation = ACT2FN[config.adapter_act]
        self.up_sampler = nn.Linear(bottleneck, config.d_model)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.up_sampler(self.activation(self.down_sampler(hidden_states))) + hidden_states


def _norm(config: JointEncoderConfig) -> nn.Module:
    """The backbone's norm: T5's RMS norm (weight only), or BART's `nn.LayerNorm` (weight and bias)."""
    if config.backbone == "bart":
        return nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
    return JointEncoderLayerNorm(config.d_model, eps=config.layer_norm_epsilon)


class JointEncoderVisualEmbedding(nn.Module):
    """
    VL-T5's (and VL-BART's) visual embedding of one token per region / grid cell:
    `((Norm(Linear(feats)) + Norm(Linear([boxes, area]))) + img_order_emb) + token_emb(vocab - 1 - obj_order)`,
    with one norm per projection (`individual_vis_layer_norm`) or one `layer_norm` after the sum; the norm is T5's RMS
    norm or, for BART, `nn.LayerNorm` (j-min/VL-T5 `modeling_bart.py` `VisualEmbedding`, lines 31-143).

    The object-order embedding is the token embedding itself (rows of `<vis_extra_id_k>`), so it is passed in at call
    time instead of being registered twice.
    """

    def __init__(self, config: JointEncoderConfig):
        super().__init__()
        self.config = config
        individual_norm = config.use_vis_layer_norm and config.individual_vis_layer_norm
        feat_layers = [nn.Linear(config.feat_dim, config.d_model)]
        pos_layers = [nn.Linear(config.pos_dim + 1, config.d_model)]
        if individual_norm:
            feat_layers.append(_norm(config))
            pos_layers.append(_norm(config))
        self.feat_embedding = nn.Sequential(*feat_layers)
        self.absolute_vis_pos_embedding = nn.Sequential(*pos_layers)
        if config.use_vis_order_embedding:
            self.img_order_embedding = nn.Embedding(config.n_images, config.d_model)
        if config.use_vis_layer_norm and not config.individual_vis_layer_norm:
            self.layer_norm = _norm(config)

    def box_area(self, boxes: torch.Tensor) -> torch.Tensor:
        if self.config.box_area == "vl_t5":
            # VL-T5 computes (b[3] - b[2]) * (b[1] - b[0]) on (x1, y1, x2, y2) boxes, i.e. (y2 - x2) * (y1 - x1).
            # Released checkpoints were trained with this value, so parity needs it.
            return (boxes[..., 3] - boxes[..., 2]) * (boxes[..., 1] - boxes[..., 0])
        return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])

    def forward(
        self,
        visual_feats: torch.Tensor,  # (B, V, feat_dim)
        visual_pos: torch.Tensor,  # (B, V, 4)
        image_order_ids: torch.Tensor | None,  # (B, V)
        object_order_ids: torch.Tensor | None,  # (B, V)
        token_embedding: nn.Embedding,
    ) -> torch.Tensor:
        batch_size, num_tokens = visual_feats.shape[:2]
        feat = self.feat_embedding(visual_feats)  # (B, V, d_model)
        area = self.box_area(visual_pos).unsqueeze(-1)  # (B, V, 1)
        pos = self.absolute_vis_pos_embedding(torch.cat([visual_pos, area], dim=-1).to(feat.dtype))  # (B, V, d)
        embedding = feat + pos
        if self.config.use_vis_order_embedding:
            device = visual_feats.device
            if image_order_ids is None:
                image_order_ids = torch.zeros(batch_size, num_tokens, dtype=torch.long, device=device)
            if object_order_ids is None:
                object_order_ids = torch.arange(num_tokens, dtype=torch.long, device=device).expand(batch_size, -1)
            embedding = embedding + self.img_order_embedding(image_order_ids)
            # <vis_extra_id_k> is token vocab_size - 1 - k (VL-T5 tokenizer layout)
            embedding = embedding + token_embedding(self.config.vocab_size - 1 - object_order_ids)
        if hasattr(self, "layer_norm"):
            embedding = self.layer_norm(embedding)
        return embedding


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, T, d_kv)
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float = 1.0,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,  # (B or 1, H, T, T), additive
    softmax_dtype: torch.dtype = torch.float32,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with the weights materialised (returned with `output_attentions`): softmax in `softmax_dtype` (fp32,
    as T5; BART passes its own dtype, at least fp32, so that a float64 model stays exact).
    Returns (context (B, T, H, d_kv), weights (B, H, T, T)), the layout of transformers' attention interfaces."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, T, T)
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores.to(softmax_dtype), dim=-1).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    context = torch.matmul(weights, value)  # (B, H, T, d_kv)
    return context.transpose(1, 2).contiguous(), weights


class JointEncoderAttention(nn.Module):
    """T5 self-attention: no 1/sqrt(d) scaling; position bias and mask are one additive float tensor, given to the
    attention function (eager, sdpa, flex, through transformers' `ALL_ATTENTION_FUNCTIONS`) as `position_bias`."""

    def __init__(self, config: JointEncoderConfig, has_relative_attention_bias: bool = False):
        super().__init__()
        self.config = config
        self.has_relative_attention_bias = has_relative_attention_bias
        self.n_heads = config.num_heads
        self.d_kv = config.d_kv
        self.inner_dim = config.num_heads * config.d_kv
        self.dropout = config.dropout_rate
        self.is_causal = False  # an encoder: every token sees every token (what sdpa/flex read)
        self.q = nn.Linear(config.d_model, self.inner_dim, bias=False)
        self.k = nn.Linear(config.d_model, self.inner_dim, bias=False)
        self.v = nn.Linear(config.d_model, self.inner_dim, bias=False)
        self.o = nn.Linear(self.inner_dim, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
            self._bucket_cache: dict[tuple[int, str, bool], torch.Tensor] = {}

    @staticmethod
    def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
        """Bidirectional T5 buckets (Raffel et al., 2020; mesh-tensorflow `_relative_position_bucket`)."""
        num_buckets //= 2
        buckets = (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
        max_exact = num_buckets // 2
        is_small = relative_position < max_exact
        if_large = max_exact + (
            torch.log(relative_position.float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).to(torch.long)
        if_large = torch.clamp(if_large, max=num_buckets - 1)
        return buckets + torch.where(is_small, relative_position, if_large)

    def compute_bias(self, text_length: int, total_length: int, device: torch.device) -> torch.Tensor:
        """T5 relative bias on the text x text block, zero for every pair involving a visual token."""
        # The buckets depend only on the text length: computed once per (length, device), not in every forward.
        # A tensor made under torch.inference_mode cannot be saved for backward: buckets made there are cached apart.
        cache_key = (text_length, str(device), torch.is_inference_mode_enabled())
        buckets = self._bucket_cache.get(cache_key)
        if buckets is None:
            position = torch.arange(text_length, dtype=torch.long, device=device)
            relative_position = position[None, :] - position[:, None]  # (L, L): memory - query
            buckets = self.relative_position_bucket(
                relative_position,
                num_buckets=self.config.relative_attention_num_buckets,
                max_distance=self.config.relative_attention_max_distance,
            )
            if len(self._bucket_cache) >= 64:
                self._bucket_cache.clear()
            self._bucket_cache[cache_key] = buckets
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, L, L)
        pad = total_length - text_length
        return F.pad(bias, (0, pad, 0, pad))  # (1, H, L + V, L + V)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, T, d_model)
        attention_bias: torch.Tensor,  # (B or 1, H, T, T): position bias + additive mask
        attention_interface: Callable = eager_attention_forward,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attention_interface` is chosen once per model forward (from `config._attn_implementation` and
        `output_attentions`) instead of reading the config in every layer."""
        batch_size, length = hidden_states.shape[:2]
        shape = (batch_size, length, self.n_heads, self.d_kv)
        query = self.q(hidden_states).view(shape).transpose(1, 2)  # (B, H, T, d_kv)
        key = self.k(hidden_states).view(shape).transpose(1, 2)
        value = self.v(hidden_states).view(shape).transpose(1, 2)
        context, weights = attention_interface(
            self,
            query,
            key,
            value,
            None,  # the mask is already in the bias
            dropout=self.dropout if self.training else 0.0,
            scaling=1.0,  # T5 folds the 1/sqrt(d) scaling into its initialisation
            # the fused kernels need the bias in the query's dtype (under autocast too); eager adds it in its own
            position_bias=attention_bias if attention_interface is eager_attention_forward else attention_bias.to(query.dtype),
        )  # (B, T, H, d_kv)
        return self.o(context.reshape(batch_size, length, self.inner_dim)), weights


class JointEncoderLayerSelfAttention(nn.Module):
    def __init__(self, config: JointEncoderConfig, has_relative_attention_bias: bool = False):
        super().__init__()
        self.SelfAttention = JointEncoderAttention(config, has_relative_attention_bias)
        self.layer_norm = JointEncoderLayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        if config.adapter_reduction_factor is not None:
            self.adapter = JointEncoderAdapter(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden_states, attention_bias, attention_interface=eager_attention_forward):
        attention_output, weights = self.SelfAttention(self.layer_norm(hidden_states), attention_bias, attention_interface)
        if hasattr(self, "adapter"):
            attention_output = self.adapter(attention_output)
        return hidden_states + self.dropout(attention_output), weights


class JointEncoderDenseActDense(nn.Module):
    def __init__(self, config: JointEncoderConfig):
        super().__init__()
        if config.is_gated_act:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.act = ACT2FN[config.dense_act_fn]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "wi"):
            hidden_states = self.act(self.wi(hidden_states))
        else:
            hidden_states = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
        hidden_states = self.dropout(hidden_states)
        if hidden_states.dtype != self.wo.weight.dtype and not torch.is_autocast_enabled():
            hidden_states = hidden_states.to(self.wo.weight.dtype)
        return self.wo(hidden_states)


class JointEncoderLayerFF(nn.Module):
    def __init__(self, config: JointEncoderConfig):
        super().__init__()
        self.DenseReluDense = JointEncoderDenseActDense(config)
        self.layer_norm = JointEncoderLayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        if config.adapter_reduction_factor is not None:
            self.adapter = JointEncoderAdapter(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        forwarded = self.DenseReluDense(self.layer_norm(hidden_states))
        if hasattr(self, "adapter"):
            forwarded = self.adapter(forwarded)
        return hidden_states + self.dropout(forwarded)


class JointEncoderBlock(GradientCheckpointingLayer):
    def __init__(self, config: JointEncoderConfig, has_relative_attention_bias: bool = False):
        super().__init__()
        self.layer = nn.ModuleList(
            [JointEncoderLayerSelfAttention(config, has_relative_attention_bias), JointEncoderLayerFF(config)]
        )

    def forward(self, hidden_states, attention_bias, attention_interface=eager_attention_forward):
        hidden_states, weights = self.layer[0](hidden_states, attention_bias, attention_interface)
        hidden_states = _clamp_fp16(hidden_states)
        hidden_states = _clamp_fp16(self.layer[1](hidden_states))
        return hidden_states, weights


def _clamp_fp16(hidden_states: torch.Tensor) -> torch.Tensor:
    # As transformers' T5: keep fp16 activations finite (no-op in fp32/bf16).
    if hidden_states.dtype == torch.float16:
        limit = torch.finfo(torch.float16).max - 1000
        hidden_states = torch.clamp(hidden_states, min=-limit, max=limit)
    return hidden_states


class JointEncoderBartAttention(nn.Module):
    """BART self-attention (transformers' `BartAttention`, encoder side): q/k/v/out projections with biases, scores
    scaled by head_dim**-0.5, the additive mask given to the attention function (eager, sdpa, flex) as transformers'
    BART does. No position bias: text positions are learned embeddings added before the first layer."""

    def __init__(self, config: JointEncoderConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.head_dim = config.d_kv  # d_model // num_heads (checked by the config)
        self.scaling = self.head_dim**-0.5
        self.dropout = config.dropout_rate if config.attention_dropout is None else config.attention_dropout
        self.is_causal = False  # an encoder: every token sees every token (what sdpa/flex read)
        self.k_proj = nn.Linear(config.d_model, config.d_model)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, T, d_model)
        attention_mask: torch.Tensor | None,  # (B, 1, 1, T) additive (flex: (B, 1, T, T)), None: attend everywhere
        attention_interface: Callable = eager_attention_forward,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, length = hidden_states.shape[:2]
        shape = (batch_size, length, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, H, T, head_dim)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if attention_mask is not None and attention_interface is not eager_attention_forward:
            attention_mask = attention_mask.to(query.dtype)  # the fused kernels need the query's dtype (autocast)
        context, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            softmax_dtype=torch.promote_types(query.dtype, torch.float32),  # BART: the tensors' dtype, fp32 at least
        )  # (B, T, H, head_dim)
        return self.out_proj(context.reshape(batch_size, length, -1)), weights


class JointEncoderBartLayer(GradientCheckpointingLayer):
    """
    BART's post-norm encoder layer (transformers' `BartEncoderLayer`; VL-Adapter's copy in
    `my_transformers/modeling_bart.py` 425-519 adds the adapters): `h = LN(h + dropout(adapter(attn(h))))`,
    `h = LN(h + dropout(adapter(fc2(act_dropout(act(fc1(h)))))))`. VL-Adapter's `attn_adapter` / `ff_adapter` run
    before the dropout and the residual.
    """

    def __init__(self, config: JointEncoderConfig):
        super().__init__()
        self.self_attn = JointEncoderBartAttention(config)
        self.self_attn_layer_norm = _norm(config)
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)
        self.final_layer_norm = _norm(config)
        if config.adapter_reduction_factor is not None:
            self.attn_adapter = JointEncoderAdapter(config)
            self.ff_adapter = JointEncoderAdapter(config)
        self.activation_fn = ACT2FN[config.dense_act_fn]  # "gelu" = exact erf GELU, as BART's
        self.dropout = nn.Dropout(config.dropout_rate)
        self.activation_dropout = nn.Dropout(
            config.dropout_rate if config.activation_dropout is None else config.activation_dropout
        )

    def forward(self, hidden_states, attention_mask, attention_interface=eager_attention_forward):
        residual = hidden_states
        attention_output, weights = self.self_attn(hidden_states, attention_mask, attention_interface)
        if hasattr(self, "attn_adapter"):
            attention_output = self.attn_adapter(attention_output)
        hidden_states = self.self_attn_layer_norm(residual + self.dropout(attention_output))
        residual = hidden_states
        forwarded = self.fc2(self.activation_dropout(self.activation_fn(self.fc1(hidden_states))))
        if hasattr(self, "ff_adapter"):
            forwarded = self.ff_adapter(forwarded)
        hidden_states = self.final_layer_norm(residual + self.dropout(forwarded))
        # transformers 4.2.1 (the originals' pin) clamps non-finite values in any dtype, current transformers in fp16
        # only; both leave finite fp32 outputs unchanged. Clamped in fp16 without reading the values (no sync).
        return _clamp_fp16(hidden_states), weights


def _adaptive_grid_pool(tokens: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Pool a square grid of tokens (B, g*g, C) to (B, size*size, C)."""
    batch_size, num_tokens, channels = tokens.shape
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens:
        raise ValueError(
            f"grid pooling needs a square grid of visual tokens, got {num_tokens} tokens; unset "
            f"visual_downsample_size / vision_grid_pool_size or give grid features"
        )
    grid_tokens = tokens.transpose(1, 2).reshape(batch_size, channels, grid, grid)
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    return pool(grid_tokens, size).reshape(batch_size, channels, size * size).transpose(1, 2)


def _images_per_sequence(num_tokens: int, n_images: int, image_order_ids: torch.Tensor | None) -> int:
    """How many equal square grids `num_tokens` visual tokens are: n in 1..n_images with num_tokens / n a square.
    Unambiguous for n_images <= 3 (n * g^2 is a square only for square n); else the image ids decide."""
    candidates = [
        n for n in range(1, n_images + 1) if num_tokens % n == 0 and math.isqrt(num_tokens // n) ** 2 == num_tokens // n
    ]
    if not candidates:
        raise ValueError(
            f"visual_downsample_size pools square grids (VL-Adapter: 7x7 = 49 tokens per image), but {num_tokens} "
            f"visual tokens are not 1..n_images={n_images} equal square grids; unset visual_downsample_size or give "
            f"grid features"
        )
    if len(candidates) > 1 and image_order_ids is not None:
        n = int(image_order_ids.max()) + 1 if image_order_ids.numel() else 1
        if n in candidates:
            return n
    if candidates[0] > 1 and image_order_ids is None:
        raise ValueError(
            f"{num_tokens} visual tokens are {candidates[0]} images' grids, not one: pass image_order_ids (image k's "
            f"tokens are the k-th block) so that each image is pooled on its own grid, as VL-Adapter does"
        )
    return candidates[0]


def _downsample_visual_inputs(
    visual_feats: torch.Tensor,  # (B, n * g*g, C)
    visual_pos: torch.Tensor,  # (B, n * g*g, 4)
    visual_attention_mask: torch.Tensor,  # (B, n * g*g)
    image_order_ids: torch.Tensor | None,  # (B, n * g*g)
    object_order_ids: torch.Tensor | None,
    size: int,
    n_images: int,
):
    """
    VL-Adapter's `--downsample` (`Downsample` in ylsung/VL_adapter `VL-T5/src/modeling_bart.py` 413-470, also used by
    its T5 encoder): each image's g x g grid is adaptive-max-pooled to size x size, BEFORE the visual embedding, and
    each image's boxes, mask and order ids keep their first size**2 tokens (image 0's, then image 1's). One grid: the
    original's 2-tuple path (VQA, GQA, captioning); two images of 49 tokens: its NLVR2 4-tuple path, 98 -> 72 tokens.
    The images are consecutive equal blocks of the sequence, as the processor and the vision tower lay them out.
    """
    batch_size, num_tokens, channels = visual_feats.shape
    n = _images_per_sequence(num_tokens, n_images, image_order_ids)
    per_image, keep = num_tokens // n, size * size
    if image_order_ids is not None and image_order_ids.device.type == "cpu" and image_order_ids.numel():
        # every real token of block k must belong to image k (values are read only on CPU: no device sync)
        expected = torch.arange(n).repeat_interleave(per_image)  # (V,)
        misplaced = (image_order_ids != expected) & visual_attention_mask.cpu().bool()
        if bool(misplaced.any()):
            row, token = (int(i) for i in misplaced.nonzero()[0])
            raise ValueError(
                f"visual_downsample_size pools each image's grid, so image k's {per_image} tokens must be the k-th "
                f"block of the visual sequence; token {token} of row {row} has image_order_ids "
                f"{int(image_order_ids[row, token])}, expected {token // per_image}"
            )
    grids = visual_feats.reshape(batch_size * n, per_image, channels)  # (B*n, g*g, C)
    pooled = _adaptive_grid_pool(grids, size, mode="max").reshape(batch_size, n * keep, channels)  # (B, n*s*s, C)

    def cut(tensor):  # (B', n * g*g, ...) -> (B', n * s*s, ...): the first s*s tokens of each image
        if tensor is None:
            return None
        rows = tensor.shape[0]
        return tensor.reshape(rows, n, per_image, *tensor.shape[2:])[:, :, :keep].reshape(rows, n * keep, *tensor.shape[2:])

    return pooled, cut(visual_pos), cut(visual_attention_mask), cut(image_order_ids), cut(object_order_ids)


def grid_boxes(rows: int, cols: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised (x1, y1, x2, y2) box of each cell of a rows x cols grid, row-major: (rows * cols, 4)."""
    ys = torch.arange(rows, device=device, dtype=dtype)
    xs = torch.arange(cols, device=device, dtype=dtype)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x / cols, y / rows, (x + 1) / cols, (y + 1) / rows], dim=-1).reshape(rows * cols, 4)


def tower_has_cls_token(tower: nn.Module) -> bool:
    """CLIP-like towers prepend a CLS token (a `class_embedding` parameter); SigLIP has none."""
    return any(name.endswith("class_embedding") for name, _ in tower.named_parameters())


@torch.no_grad()
def vision_tokens(
    tower: nn.Module,
    pixel_values: torch.Tensor,  # (N, 3, H, W)
    feature_layer: int = -1,
    feature_select: str = "patch",
    grid_pool_size: int | None = None,
    box_mode: str = "grid",
    dtype: str | None = None,
    return_pooled: bool = False,
) -> tuple[torch.Tensor, ...]:
    """
    Visual tokens of a frozen vision tower, as the joint encoder consumes them (the feature extractor calls this
    same function, so precomputed features equal the in-model ones): the hidden states of `feature_layer` (LLaVA's
    `vision_feature_layer`), without (`"patch"`) or with (`"cls_patch"`) the CLS token, optionally average-pooled
    to a `grid_pool_size`^2 grid, and each token's box (`"grid"`: its cell, CLS = whole image; `"zeros"`: VL-Adapter).

    Returns `(tokens (N, V, C) float32, boxes (V, 4))`, and the tower's `pooler_output` (N, C) when `return_pooled`
    (CLIP: post-layernorm CLS; SigLIP: attention-pooled head).
    """
    if dtype is not None:
        wanted = getattr(torch, dtype)
        if next(tower.parameters()).dtype != wanted:
            tower.to(wanted)  # vision_tower_dtype: e.g. bfloat16 on GPU halves the frozen tower's memory
    tower_dtype = next(tower.parameters()).dtype
    outputs = tower(pixel_values=pixel_values.to(tower_dtype), output_hidden_states=True)
    tokens = outputs.hidden_states[feature_layer]  # (N, 1 + g*g, C) CLIP or (N, g*g, C) SigLIP
    if tower_has_cls_token(tower):
        cls_token, patches = tokens[:, :1], tokens[:, 1:]
    else:
        cls_token, patches = None, tokens
    if grid_pool_size is not None:
        patches = _adaptive_grid_pool(patches, grid_pool_size, mode="avg")  # (N, s*s, C)
    grid = math.isqrt(patches.shape[1])
    if grid * grid != patches.shape[1]:
        raise ValueError(f"the vision tower gives {patches.shape[1]} patch tokens, not a square grid")
    boxes = grid_boxes(grid, grid, device=patches.device)  # (g*g, 4)
    if feature_select == "cls_patch":
        if cls_token is None:
            raise ValueError(
                f"vision_feature_select='cls_patch' but the tower ({type(tower).__name__}) has no CLS token (SigLIP): "
                f"use 'patch'"
            )
        patches = torch.cat([cls_token, patches], dim=1)  # (N, 1 + g*g, C)
        boxes = torch.cat([boxes.new_tensor([[0.0, 0.0, 1.0, 1.0]]), boxes], dim=0)  # CLS covers the whole image
    if box_mode == "zeros":
        boxes = torch.zeros_like(boxes)
    if return_pooled:
        return patches.float(), boxes, outputs.pooler_output.float()
    return patches.float(), boxes


class JointEncoderPreTrainedModel(PreTrainedModel):
    config_class = JointEncoderConfig
    config: JointEncoderConfig
    base_model_prefix = "joint_encoder"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["JointEncoderBlock", "JointEncoderBartLayer"]
    _keep_in_fp32_modules = ["wo"]  # as T5: the feed-forward output overflows in fp16
    _supports_sdpa = True
    _supports_flex_attn = True  # the bias (relative positions on text x text, and the mask) is a score_mod
    _supports_flash_attn = False  # flash attention takes no additive bias
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^lm_head\."]

    def _init_weights(self, module):
        """T5's initialisation (Mesh TensorFlow), `initializer_factor` scaling it; for BART, BART's (every Linear and
        Embedding ~ N(0, 0.02 * initializer_factor), biases 0, LayerNorms 1 / 0). Adapters start near the identity."""
        from transformers import initialization as init

        factor = self.config.initializer_factor
        if self.config.backbone == "bart":
            std = 0.02 * factor
            if isinstance(module, JointEncoderAdapter):
                for linear in (module.down_sampler, module.up_sampler):
                    init.normal_(linear.weight, mean=0.0, std=1e-2)
                    init.zeros_(linear.bias)
            elif isinstance(module, nn.Linear):  # an adapter's Linears: re-initialised by the adapter, applied after
                init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                init.ones_(module.weight)
                init.zeros_(module.bias)
            return
        d_model, d_kv, n_heads = self.config.d_model, self.config.d_kv, self.config.num_heads
        if isinstance(module, JointEncoderLayerNorm):
            init.constant_(module.weight, factor)
        elif isinstance(module, JointEncoderModel):
            init.normal_(module.shared.weight, mean=0.0, std=factor)
            if module.projection is not None:
                init.normal_(module.projection.weight, mean=0.0, std=factor * d_model**-0.5)
                init.zeros_(module.projection.bias)
        elif isinstance(module, JointEncoderDenseActDense):
            for name in ("wi", "wi_0", "wi_1"):
                if hasattr(module, name):
                    init.normal_(getattr(module, name).weight, mean=0.0, std=factor * d_model**-0.5)
            init.normal_(module.wo.weight, mean=0.0, std=factor * self.config.d_ff**-0.5)
        elif isinstance(module, JointEncoderAttention):
            init.normal_(module.q.weight, mean=0.0, std=factor * (d_model * d_kv) ** -0.5)
            init.normal_(module.k.weight, mean=0.0, std=factor * d_model**-0.5)
            init.normal_(module.v.weight, mean=0.0, std=factor * d_model**-0.5)
            init.normal_(module.o.weight, mean=0.0, std=factor * (n_heads * d_kv) ** -0.5)
            if module.has_relative_attention_bias:
                init.normal_(module.relative_attention_bias.weight, mean=0.0, std=factor * d_model**-0.5)
        elif isinstance(module, JointEncoderAdapter):
            # near-identity adapters at initialisation (Houlsby et al., 2019)
            init.normal_(module.down_sampler.weight, mean=0.0, std=1e-2)
            init.zeros_(module.down_sampler.bias)
            init.normal_(module.up_sampler.weight, mean=0.0, std=1e-2)
            init.zeros_(module.up_sampler.bias)
        elif isinstance(module, JointEncoderVisualEmbedding):
            for linear in (module.feat_embedding[0], module.absolute_vis_pos_embedding[0]):
                init.normal_(linear.weight, mean=0.0, std=factor * linear.in_features**-0.5)
                init.zeros_(linear.bias)
            if hasattr(module, "img_order_embedding"):
                init.normal_(module.img_order_embedding.weight, mean=0.0, std=factor)


class JointEncoderModel(JointEncoderPreTrainedModel):
    r"""
    The VL-T5 / VL-BART joint encoder with a retrieval head. The same inputs, outputs and head for both backbones
    (`config.backbone`); only the encoder layers differ (see the module docstring).

    Inputs (LXMERT-style names):
        input_ids (`LongTensor` (B, L), *optional*): text token ids (VL-T5 tokenizer, texts end with `</s>`; VL-BART:
            bart-base's + 200 tokens, `<s> ... </s>`). At most `max_position_embeddings` tokens for BART.
        attention_mask (`LongTensor` (B, L), *optional*): 1 for real tokens; defaults to `input_ids != pad_token_id`.
        visual_feats (`FloatTensor` (B, V, feat_dim), *optional*): region / grid features.
        visual_pos (`FloatTensor` (B, V, 4), *optional*): boxes (x1, y1, x2, y2) in [0, 1]; zeros if absent.
        visual_attention_mask (`LongTensor` (B, V), *optional*): 1 for real visual tokens; defaults to ones.
        image_order_ids (`LongTensor` (B, V), *optional*): image index of each visual token (< n_images); zeros.
        object_order_ids (`LongTensor` (B, V), *optional*): index of each token within its image; 0..V-1.
        pixel_values (`FloatTensor` (B, 3, H, W) or (B, n, 3, H, W), *optional*): images for the frozen vision
            tower (needs `config.vision_config`); replaces `visual_feats`.
        pixel_attention_mask (`LongTensor` (B, n), *optional*): which of the n images of each query are real.

    Returns [`JointEncoderOutput`] (or a tuple with `return_dict=False`).
    """

    def __init__(self, config: JointEncoderConfig):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        if config.backbone == "bart":
            # BartLearnedPositionalEmbedding: max_position_embeddings + 2 rows, position i reads row i + 2
            self.embed_positions = nn.Embedding(config.max_position_embeddings + BART_POSITION_OFFSET, config.d_model)
            self.layernorm_embedding = _norm(config)
            self.visual_embedding = JointEncoderVisualEmbedding(config)
            self.layers = nn.ModuleList([JointEncoderBartLayer(config) for _ in range(config.num_layers)])
        else:
            self.visual_embedding = JointEncoderVisualEmbedding(config)
            self.block = nn.ModuleList(
                [JointEncoderBlock(config, has_relative_attention_bias=(i == 0)) for i in range(config.num_layers)]
            )
            self.final_layer_norm = JointEncoderLayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.projection = (
            nn.Linear(config.d_model, config.projection_dim) if config.projection_dim is not None else None
        )
        self.vision_model = None
        if config.vision_config is not None and config.vision_config.model_type == "clip_resnet_vision_model":
            from .clip_resnet import CLIPResNetVisionModel  # not an Auto class of transformers

            self.vision_model = CLIPResNetVisionModel(config.vision_config)
        elif config.vision_config is not None:
            self.vision_model = AutoModel.from_config(config.vision_config)
        self.gradient_checkpointing = False
        self.post_init()
        self.freeze_vision_model()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, then the files sentence-transformers reads (`modules.json`, ...; see
        `sentence_transformers_files`), so the folder also loads with `SentenceTransformer(folder, trust_remote_code=True)`
        (with the processor saved next to it)."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            from .sentence_transformers_files import write_sentence_transformers_files

            write_sentence_transformers_files(save_directory, self.config)
        return result

    # ----------------------------------------------------------------------------------------------- embeddings
    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def set_input_embeddings(self, new_embeddings: nn.Embedding):
        self.shared = new_embeddings

    @property
    def encoder_blocks(self) -> nn.ModuleList:
        """The encoder's layers, first to last, whatever the backbone (`block` for T5, `layers` for BART)."""
        return self.layers if self.config.backbone == "bart" else self.block

    # -------------------------------------------------------------------------------------------- vision tower
    def freeze_vision_model(self):
        """The vision tower is always frozen: no gradients, eval mode (dropout off), never updated by training."""
        if self.vision_model is not None:
            self.vision_model.requires_grad_(False)
            self.vision_model.eval()

    def train(self, mode: bool = True):
        """`nn.Module.train`, except the vision tower, which stays in eval mode and frozen. `from_pretrained` ends with
        `model.eval()`, so this also re-freezes the parameters it loads (loading creates them with requires_grad)."""
        super().train(mode)
        self.freeze_vision_model()
        return self

    @torch.no_grad()
    def get_image_features(
        self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """
        Visual tokens from the frozen tower: `pixel_values` (B, 3, H, W) or (B, n, 3, H, W) ->
        dict(visual_feats (B, n*V, C), visual_pos (B, n*V, 4), visual_attention_mask, image_order_ids,
        object_order_ids). Precomputed features of these tokens fed to `forward` give the same embedding.
        """
        if self.vision_model is None:
            raise ValueError(
                "pixel_values given but this model has no vision tower (config.vision_config is None): pass "
                "precomputed visual_feats, or build the model with a vision_config (see attach_vision_tower)"
            )
        _require_tensor("pixel_values", pixel_values, "float")
        _check_finite("pixel_values", pixel_values)
        if pixel_attention_mask is not None:
            _require_tensor("pixel_attention_mask", pixel_attention_mask, "mask")
            _check_mask_values("pixel_attention_mask", pixel_attention_mask)
        if pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(1)
        if pixel_values.dim() != 5:
            raise ValueError(
                f"pixel_values must be (batch, 3, H, W) or (batch, n_images, 3, H, W), got {tuple(pixel_values.shape)}"
            )
        batch_size, n_images = pixel_values.shape[:2]
        if n_images > self.config.n_images:
            raise ValueError(f"{n_images} images per query but the model has n_images={self.config.n_images}")
        patches, boxes = vision_tokens(
            self.vision_model,
            pixel_values.flatten(0, 1),
            feature_layer=self.config.vision_feature_layer,
            feature_select=self.config.vision_feature_select,
            grid_pool_size=self.config.vision_grid_pool_size,
            box_mode=self.config.vision_box_mode,
            dtype=self.config.vision_tower_dtype,
        )  # (B*n, V, C), (V, 4)
        per_image = patches.shape[1]
        feats = patches.float().reshape(batch_size, n_images * per_image, -1)
        visual_pos = boxes.expand(batch_size, n_images, per_image, 4).reshape(batch_size, n_images * per_image, 4)
        image_order_ids = torch.arange(n_images, device=feats.device).repeat_interleave(per_image)
        object_order_ids = torch.arange(per_image, device=feats.device).repeat(n_images)
        if pixel_attention_mask is None:
            visual_attention_mask = torch.ones(batch_size, n_images * per_image, dtype=torch.long, device=feats.device)
        else:
            visual_attention_mask = pixel_attention_mask.to(feats.device).long().repeat_interleave(per_image, dim=1)
        return {
            "visual_feats": feats,
            "visual_pos": visual_pos,
            "visual_attention_mask": visual_attention_mask,
            "image_order_ids": image_order_ids.expand(batch_size, -1),
            "object_order_ids": object_order_ids.expand(batch_size, -1),
        }

    # ------------------------------------------------------------------------------------------------- checks
    def _check_inputs(self, input_ids, attention_mask, visual_feats, visual_pos, visual_attention_mask,
                      image_order_ids, object_order_ids):
        """Type and shape checks cost nothing; value checks (id ranges, 0/1 masks, finite features and boxes) run
        for CPU tensors, and for GPU tensors only under VL_JOINT_ENCODER_DEBUG=1 (they synchronise the device).
        Every error is a ValueError naming the argument."""
        config = self.config
        for name, value, kind in (
            ("input_ids", input_ids, "integer"),
            ("attention_mask", attention_mask, "mask"),
            ("visual_feats", visual_feats, "float"),
            ("visual_pos", visual_pos, "float"),
            ("visual_attention_mask", visual_attention_mask, "mask"),
            ("image_order_ids", image_order_ids, "integer"),
            ("object_order_ids", object_order_ids, "integer"),
        ):
            if value is not None:
                _require_tensor(name, value, kind)
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, text_length), got shape {tuple(input_ids.shape)}")
            if _check_values(input_ids) and input_ids.numel():
                low, high = int(input_ids.min()), int(input_ids.max())
                if low < 0 or high >= config.vocab_size:
                    raise ValueError(
                        f"input_ids hold ids in [{low}, {high}] but the vocabulary has {config.vocab_size} entries: "
                        f"use the model's own tokenizer"
                    )
            if config.backbone == "bart" and input_ids.shape[1] > config.max_position_embeddings:
                raise ValueError(
                    f"input_ids has {input_ids.shape[1]} tokens but BART has {config.max_position_embeddings} learned "
                    f"positions (config.max_position_embeddings): truncate the text (processor max_length)"
                )
            if attention_mask is not None and attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
                )
            if attention_mask is not None:
                _check_mask_values("attention_mask", attention_mask)
        elif attention_mask is not None:
            raise ValueError("attention_mask given without input_ids")
        if visual_feats is None:
            for name, value in (
                ("visual_pos", visual_pos),
                ("visual_attention_mask", visual_attention_mask),
                ("image_order_ids", image_order_ids),
                ("object_order_ids", object_order_ids),
            ):
                if value is not None:
                    raise ValueError(f"{name} given without visual_feats: pass the visual features too")
            if input_ids is None:
                raise ValueError("give input_ids, visual_feats (or pixel_values), or both")
            return
        if visual_feats.dim() != 3:
            raise ValueError(f"visual_feats must be (batch, visual_length, feat_dim), got {tuple(visual_feats.shape)}")
        batch_size, num_visual, feat_dim = visual_feats.shape
        if feat_dim != config.feat_dim:
            raise ValueError(
                f"visual_feats has {feat_dim} features but the model expects {config.feat_dim} (config.feat_dim): "
                f"extract features with the backbone the model was trained with"
            )
        if input_ids is not None and input_ids.shape[0] != batch_size:
            raise ValueError(f"input_ids has batch size {input_ids.shape[0]} but visual_feats has {batch_size}")
        if visual_pos is not None:
            if visual_pos.dim() != 3 or visual_pos.shape[-1] != config.pos_dim:
                raise ValueError(
                    f"visual_pos must be (batch, visual_length, {config.pos_dim}) boxes (x1, y1, x2, y2), got shape "
                    f"{tuple(visual_pos.shape)}"
                )
            if visual_pos.shape[:2] != (batch_size, num_visual):
                raise ValueError(
                    f"visual_pos covers {tuple(visual_pos.shape[:2])} (batch, tokens) but visual_feats has "
                    f"{(batch_size, num_visual)}"
                )
            _check_finite("visual_pos", visual_pos)
        _check_finite("visual_feats", visual_feats)
        for name, value in (
            ("visual_attention_mask", visual_attention_mask),
            ("image_order_ids", image_order_ids),
            ("object_order_ids", object_order_ids),
        ):
            if value is not None and tuple(value.shape) != (batch_size, num_visual):
                raise ValueError(
                    f"{name} must have shape (batch, visual_length) = {(batch_size, num_visual)}, got "
                    f"{tuple(value.shape)}"
                )
        if visual_attention_mask is not None:
            _check_mask_values("visual_attention_mask", visual_attention_mask)
        if image_order_ids is not None and _check_values(image_order_ids) and image_order_ids.numel():
            if int(image_order_ids.max()) >= config.n_images or int(image_order_ids.min()) < 0:
                raise ValueError(
                    f"image_order_ids must be in [0, n_images={config.n_images}), got values up to "
                    f"{int(image_order_ids.max())}"
                )
        if object_order_ids is not None and _check_values(object_order_ids) and object_order_ids.numel():
            if int(object_order_ids.max()) >= config.vocab_size or int(object_order_ids.min()) < 0:
                raise ValueError(f"object_order_ids must be in [0, vocab_size={config.vocab_size})")

    # ------------------------------------------------------------------------------------------------ forward
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        visual_feats: torch.FloatTensor | None = None,
        visual_pos: torch.FloatTensor | None = None,
        visual_attention_mask: torch.Tensor | None = None,
        image_order_ids: torch.LongTensor | None = None,
        object_order_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> JointEncoderOutput | tuple:
        config = self.config
        if kwargs:
            raise TypeError(f"JointEncoderModel.forward got unexpected arguments: {sorted(kwargs)}")
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions

        if pixel_values is not None:
            if visual_feats is not None:
                raise ValueError("give either pixel_values (vision tower) or visual_feats (precomputed), not both")
            if any(v is not None for v in (visual_pos, visual_attention_mask, image_order_ids, object_order_ids)):
                raise ValueError(
                    "visual_pos / visual_attention_mask / order ids are computed from pixel_values by the tower: "
                    "do not pass them with pixel_values (use pixel_attention_mask to mask images)"
                )
            tower_inputs = self.get_image_features(pixel_values, pixel_attention_mask)
            visual_feats = tower_inputs["visual_feats"]
            visual_pos = tower_inputs["visual_pos"]
            visual_attention_mask = tower_inputs["visual_attention_mask"]
            image_order_ids = tower_inputs["image_order_ids"]
            object_order_ids = tower_inputs["object_order_ids"]

        self._check_inputs(input_ids, attention_mask, visual_feats, visual_pos, visual_attention_mask,
                           image_order_ids, object_order_ids)

        text_length = input_ids.shape[1] if input_ids is not None else 0
        masks = []
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = (input_ids != config.pad_token_id).long()
            masks.append(attention_mask.long())
        if visual_feats is not None:
            batch_size, num_visual = visual_feats.shape[:2]
            if visual_pos is None:
                visual_pos = visual_feats.new_zeros(batch_size, num_visual, config.pos_dim)
            if visual_attention_mask is None:
                visual_attention_mask = torch.ones(batch_size, num_visual, dtype=torch.long, device=visual_feats.device)
            if config.visual_downsample_size is not None:
                # VL-Adapter --downsample: each image's 7x7 CLIP grid -> 6x6 by adaptive max pooling, the rest is cut
                visual_feats, visual_pos, visual_attention_mask, image_order_ids, object_order_ids = (
                    _downsample_visual_inputs(
                        visual_feats, visual_pos, visual_attention_mask, image_order_ids, object_order_ids,
                        config.visual_downsample_size, config.n_images,
                    )
                )
            masks.append(visual_attention_mask.long())
        joint_mask = torch.cat(masks, dim=1) if len(masks) > 1 else masks[0]  # (B, L + V)
        visual_inputs = None
        if visual_feats is not None:
            embedding_dtype = self.shared.weight.dtype
            visual_inputs = (visual_feats.to(embedding_dtype), visual_pos.to(embedding_dtype), image_order_ids,
                             object_order_ids)
        # eager when the weights are asked for; else the configured implementation (sdpa, flex_attention, ...)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            "eager" if output_attentions else config._attn_implementation, eager_attention_forward
        )
        encode = self._encode_bart if config.backbone == "bart" else self._encode_t5
        hidden_states, all_hidden_states, all_attentions = encode(
            input_ids, visual_inputs, joint_mask, attention_interface, output_hidden_states, output_attentions
        )

        pooled = self.pool(hidden_states, joint_mask, text_length)
        return JointEncoderOutput(
            last_hidden_state=hidden_states,
            pooler_output=pooled,
            attention_mask=joint_mask,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )

    def _encode_t5(self, input_ids, visual_inputs, joint_mask, attention_interface, output_hidden_states,
                   output_attentions):
        """VL-T5's `JointEncoder.forward` (j-min/VL-T5 `modeling_t5.py`): cat[token embeddings, visual embedding],
        dropout, T5 blocks with the relative bias on text x text pairs, final RMS norm, dropout."""
        config = self.config
        embeddings = []
        if input_ids is not None:
            embeddings.append(self.shared(input_ids))  # (B, L, d) -- no scaling in T5
        if visual_inputs is not None:
            embeddings.append(self.visual_embedding(*visual_inputs, self.shared))  # (B, V, d)
        text_length = input_ids.shape[1] if input_ids is not None else 0
        hidden_states = torch.cat(embeddings, dim=1) if len(embeddings) > 1 else embeddings[0]  # (B, L + V, d)
        total_length = hidden_states.shape[1]

        # Position bias (text x text only) + additive mask, computed once and shared by every block.
        dtype = hidden_states.dtype
        if text_length > 0:
            position_bias = self.block[0].layer[0].SelfAttention.compute_bias(
                text_length, total_length, hidden_states.device
            ).to(dtype)  # (1, H, T, T)
        else:
            position_bias = hidden_states.new_zeros(1, config.num_heads, total_length, total_length)
        if joint_mask.device.type == "cpu" and bool(joint_mask.all()):
            # nothing to mask: a batch-independent (1, H, T, T) bias is cheaper for every layer. Only decided for CPU
            # tensors, where reading the mask costs no device synchronisation.
            attention_bias = position_bias
        else:
            mask_bias = (1.0 - joint_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min  # (B, 1, 1, T)
            attention_bias = position_bias + mask_bias  # (B, H, T, T)

        hidden_states = self.dropout(hidden_states)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for block in self.block:
            hidden_states, weights = block(hidden_states, attention_bias, attention_interface)
            if output_attentions:
                all_attentions += (weights,)
            if output_hidden_states and block is not self.block[-1]:
                all_hidden_states += (hidden_states,)
        hidden_states = self.dropout(self.final_layer_norm(hidden_states))
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return hidden_states, all_hidden_states, all_attentions

    def _encode_bart(self, input_ids, visual_inputs, joint_mask, attention_interface, output_hidden_states,
                     output_attentions):
        """VL-BART's `JointEncoder.forward` (j-min/VL-T5 `modeling_bart.py` 159-281; VL-Adapter's 589-751):
        text = layernorm_embedding(embed_tokens(ids) * embed_scale + embed_positions(arange(L) + 2)), visual tokens
        after it (through layernorm_embedding too with share_vis_lang_layer_norm), ONE dropout over the
        concatenation, post-norm layers with the additive mask finfo(dtype).min, no final norm."""
        config = self.config
        embeddings = []
        if input_ids is not None:
            text = self.shared(input_ids)  # (B, L, d)
            if config.scale_embedding:
                text = text * math.sqrt(config.d_model)
            positions = torch.arange(input_ids.shape[1], device=input_ids.device) + BART_POSITION_OFFSET  # (L,)
            embeddings.append(self.layernorm_embedding(text + self.embed_positions(positions)))  # (B, L, d)
        if visual_inputs is not None:
            visual = self.visual_embedding(*visual_inputs, self.shared)  # (B, V, d)
            if config.share_vis_lang_layer_norm:  # layernorm_embedding(cat[text, visual]): it acts per token
                visual = self.layernorm_embedding(visual)
            embeddings.append(visual)
        hidden_states = torch.cat(embeddings, dim=1) if len(embeddings) > 1 else embeddings[0]  # (B, L + V, d)

        dtype = hidden_states.dtype
        if joint_mask.device.type == "cpu" and bool(joint_mask.all()):
            attention_mask = None  # nothing to mask (decided only for CPU tensors: no device synchronisation)
        else:
            # transformers 4.2.1 `_expand_mask`: 0 where attended, finfo(dtype).min elsewhere
            attention_mask = (1.0 - joint_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min  # (B, 1, 1, T)
            if config._attn_implementation == "flex_attention" and not output_attentions:
                total_length = hidden_states.shape[1]  # flex reads a tensor mask as [batch][0][query][key]
                attention_mask = attention_mask.expand(-1, 1, total_length, -1)  # (B, 1, T, T)

        hidden_states = self.dropout(hidden_states)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, attention_mask, attention_interface)
            if output_attentions:
                all_attentions += (weights,)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        return hidden_states, all_hidden_states, all_attentions

    # ------------------------------------------------------------------------------------------ retrieval head
    def pool(self, hidden_states: torch.Tensor, joint_mask: torch.Tensor, text_length: int) -> torch.Tensor:
        """Pooling (config.pooling) -> projection -> L2 normalisation: the retrieval embedding (B, embedding_dim)."""
        pooling = self.config.pooling
        if pooling == "first":
            if _check_values(joint_mask) and not bool(joint_mask[:, 0].all()):
                rows = (joint_mask[:, 0] == 0).nonzero().flatten().tolist()
                raise ValueError(
                    f"pooling 'first' takes the first token, but it is masked (attention mask 0, padding) in batch "
                    f"row(s) {rows[:5]}: pad on the right (the processor does), or use another pooling"
                )
            pooled = hidden_states[:, 0]
        else:
            weights = joint_mask.to(hidden_states.dtype)  # (B, T)
            if pooling == "text_mean":
                weights = weights.clone()
                weights[:, text_length:] = 0
            elif pooling == "visual_mean":
                weights = weights.clone()
                weights[:, :text_length] = 0
            if _check_values(weights) and not bool((weights.sum(dim=1) > 0).all()):
                rows = (weights.sum(dim=1) == 0).nonzero().flatten().tolist()
                kind = {"text_mean": "text token", "visual_mean": "visual token"}.get(pooling, "token")
                raise ValueError(
                    f"pooling {pooling!r} averages over no token in batch row(s) {rows[:5]}: no unmasked {kind} "
                    f"(attention_mask / visual_attention_mask all 0 there, or no "
                    f"{'text' if pooling == 'text_mean' else 'visual features' if pooling == 'visual_mean' else 'input'}"
                    f" given): give every row at least one unmasked {kind}, or use another pooling"
                )
            # (on GPU without the debug switch an empty set still gives a zero vector rather than NaN)
            counts = weights.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, 1)
            pooled = torch.einsum("bt,btd->bd", weights, hidden_states) / counts  # (B, d)
        if self.projection is not None:
            pooled = self.projection(pooled)
        if self.config.normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return pooled

    def encode(self, normalize: bool | None = None, **inputs) -> torch.Tensor:
        """`forward(**inputs).pooler_output`, L2-normalised if `normalize` (default: as the similarity needs)."""
        embedding = self(**inputs, return_dict=True).pooler_output
        if normalize is None:
            normalize = self.config.similarity == "cosine"
        return F.normalize(embedding, p=2, dim=-1) if normalize else embedding

    def similarity(self, query_embeddings: torch.Tensor, passage_embeddings: torch.Tensor, scale: bool = False):
        """
        Score matrix (Q, P) with the similarity the model is trained with (config.similarity), multiplied by
        config.logit_scale when `scale`. Training and search both call this, so they can never disagree.
        """
        return similarity_scores(
            query_embeddings, passage_embeddings, self.config.similarity, self.config.logit_scale if scale else 1.0
        )


def similarity_scores(queries: torch.Tensor, passages: torch.Tensor, similarity: str, scale: float = 1.0):
    """(Q, D) x (P, D) -> (Q, P) scores: `dot` or `cosine`, times `scale`."""
    if similarity == "cosine":
        queries = F.normalize(queries, p=2, dim=-1)
        passages = F.normalize(passages, p=2, dim=-1)
    elif similarity != "dot":
        raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
    scores = queries @ passages.transpose(0, 1)
    return scores * scale if scale != 1.0 else scores


__all__ = [
    "JointEncoderModel",
    "JointEncoderPreTrainedModel",
    "JointEncoderOutput",
    "similarity_scores",
    "grid_boxes",
    "vision_tokens",
]
