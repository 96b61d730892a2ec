"""The VL-T5 and VL-BART encoders as plain torch functions over state dicts in the ORIGINAL key layouts.

The conversion's self-check compares the converted model, reloaded from disk, against these. They are written from
the specs (`shared/docs/vl_t5_encoder_spec.md`, from j-min/VL-T5 `src/modeling_t5.py` `JointEncoder` /
`VisualEmbedding` and ylsung/VL_adapter `adapters/adapter_modeling.py`; `docs/vl_bart_encoder_spec.md`, from
j-min/VL-T5 `src/modeling_bart.py`, ylsung/VL_adapter `src/modeling_bart.py` + `my_transformers/modeling_bart.py` and
transformers 4.2.1's BART) and share no code with `vl_joint_encoder`, so a key-map or modeling bug cannot hide in
both. Eval mode (no dropout), any float dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass
class EncoderHyperParameters:
    """What the state dict alone does not say."""

    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_act: str = "relu"  # T5: relu; T5 v1.1 (gated): gelu_new
    gated: bool = False  # T5 v1.1: act(wi_0 x) * wi_1 x
    adapter_task: str | None = None
    downsample: int | None = None  # VL-Adapter --downsample: adaptive max pool of a square grid to size x size
    pad_token_id: int = 0


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # the variance is computed in fp32 whatever the input dtype, as in the original T5LayerNorm
    return weight * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


_ACTIVATIONS = {
    "relu": torch.relu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "silu": lambda x: x * torch.sigmoid(x),
}


def _bucket(relative_position: int, num_buckets: int, max_distance: int) -> int:
    """Bidirectional T5 bucket of `memory - query` (Raffel et al., 2020, mesh-tensorflow), scalar math."""
    half = num_buckets // 2
    offset = half if relative_position > 0 else 0
    distance = abs(relative_position)
    exact = half // 2
    if distance < exact:
        return offset + distance
    log_bucket = exact + int(math.log(distance / exact) / math.log(max_distance / exact) * (half - exact))
    return offset + min(log_bucket, half - 1)


def _linear(x: torch.Tensor, state: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    out = x @ state[prefix + "weight"].t()
    bias = state.get(prefix + "bias")
    return out if bias is None else out + bias


def _adapter(state: Mapping[str, torch.Tensor], prefix: str, z: torch.Tensor) -> torch.Tensor:
    return _linear(_gelu_tanh(_linear(z, state, prefix + "down_sampler.")), state, prefix + "up_sampler.") + z


def visual_embedding(
    state: Mapping[str, torch.Tensor],
    visual_feats: torch.Tensor,  # (B, V, feat_dim)
    visual_pos: torch.Tensor,  # (B, V, 4)
    image_order_ids: torch.Tensor,  # (B, V)
    object_order_ids: torch.Tensor,  # (B, V)
    eps: float,
) -> torch.Tensor:
    p = "encoder.visual_embedding."
    embedding = state["shared.weight"]
    feat = _linear(visual_feats, state, p + "feat_embedding.0.")  # (B, V, d)
    # VL-T5's area: (b[3] - b[2]) * (b[1] - b[0]), i.e. it reads (x1, y1, x2, y2) boxes as (x1, x2, y1, y2)
    area = (visual_pos[..., 3] - visual_pos[..., 2]) * (visual_pos[..., 1] - visual_pos[..., 0])
    pos = _linear(torch.cat([visual_pos, area[..., None]], dim=-1), state, p + "absolute_vis_pos_embedding.0.")
    individual = p + "feat_embedding.1.weight" in state
    if individual:
        feat = _rms_norm(feat, state[p + "feat_embedding.1.weight"], eps)
        pos = _rms_norm(pos, state[p + "absolute_vis_pos_embedding.1.weight"], eps)
    out = feat + pos
    if p + "img_order_embedding.weight" in state:
        out = out + state[p + "img_order_embedding.weight"][image_order_ids]
        out = out + embedding[embedding.shape[0] - 1 - object_order_ids]  # <vis_extra_id_k> rows
    if p + "layer_norm.weight" in state:
        out = _rms_norm(out, state[p + "layer_norm.weight"], eps)
    return out  # (B, V, d)


@torch.no_grad()
def encoder_forward(
    state: Mapping[str, torch.Tensor],
    hp: EncoderHyperParameters,
    input_ids: torch.Tensor | None = None,  # (B, L)
    attention_mask: torch.Tensor | None = None,  # (B, L)
    visual_feats: torch.Tensor | None = None,  # (B, V, feat_dim)
    visual_pos: torch.Tensor | None = None,  # (B, V, 4)
) -> torch.Tensor:
    """`last_hidden_state` (B, L + V, d_model) of the original encoder: text first, then visual tokens."""
    eps = hp.layer_norm_epsilon
    parts, masks = [], []
    if input_ids is not None:
        parts.append(state["shared.weight"][input_ids])  # (B, L, d), no scaling in T5
        mask = (input_ids != hp.pad_token_id) if attention_mask is None else attention_mask
        masks.append(mask.float())
    if visual_feats is not None:
        batch, num_visual = visual_feats.shape[:2]
        if visual_pos is None:
            visual_pos = torch.zeros(batch, num_visual, 4)
        if hp.downsample is not None:
            grid = math.isqrt(num_visual)
            x = visual_feats.transpose(1, 2).reshape(batch, -1, grid, grid)  # (B, C, g, g)
            x = torch.nn.functional.adaptive_max_pool2d(x, hp.downsample)
            visual_feats = x.flatten(2).transpose(1, 2)  # (B, s*s, C)
            num_visual = visual_feats.shape[1]
            visual_pos = visual_pos[:, :num_visual]
        image_order = torch.zeros(batch, num_visual, dtype=torch.long)
        object_order = torch.arange(num_visual).expand(batch, num_visual)
        parts.append(visual_embedding(state, visual_feats, visual_pos, image_order, object_order, eps))
        masks.append(torch.ones(batch, num_visual))
    h = torch.cat(parts, dim=1)  # (B, T, d)
    mask = torch.cat(masks, dim=1)  # (B, T)
    batch, total, _ = h.shape
    text_length = 0 if input_ids is None else input_ids.shape[1]

    table = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]  # (buckets, H)
    bias = torch.zeros(1, hp.num_heads, total, total)
    for i in range(text_length):
        for j in range(text_length):
            bias[0, :, i, j] = table[
                _bucket(j - i, hp.relative_attention_num_buckets, hp.relative_attention_max_distance)
            ]
    bias = bias + (1.0 - mask[:, None, None, :]) * -1e9  # (B, H, T, T)

    num_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.block."))
    for i in range(num_layers):
        p = f"encoder.block.{i}.layer."
        x = _rms_norm(h, state[p + "0.layer_norm.weight"], eps)
        q, k, v = (
            _linear(x, state, f"{p}0.SelfAttention.{name}.").view(batch, total, hp.num_heads, -1) for name in "qkv"
        )  # (B, T, H, d_kv)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) + bias  # no 1/sqrt(d_kv) in T5
        probs = scores.float().softmax(-1).type_as(scores)  # softmax in fp32, as the original
        context = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, total, -1)
        out = _linear(context, state, p + "0.SelfAttention.o.")
        if hp.adapter_task is not None:
            out = _adapter(state, f"{p}0.attn_adapter.adapters.{hp.adapter_task}.", out)
        h = h + out
        x = _rms_norm(h, state[p + "1.layer_norm.weight"], eps)
        act = _ACTIVATIONS[hp.feed_forward_act]
        if not hp.gated:
            x = act(_linear(x, state, p + "1.DenseReluDense.wi."))
        else:
            gate = act(_linear(x, state, p + "1.DenseReluDense.wi_0."))
            x = gate * _linear(x, state, p + "1.DenseReluDense.wi_1.")
        out = _linear(x, state, p + "1.DenseReluDense.wo.")
        if hp.adapter_task is not None:
            out = _adapter(state, f"{p}1.ff_adapter.adapters.{hp.adapter_task}.", out)
        h = h + out
    return _rms_norm(h, state["encoder.final_layer_norm.weight"], eps)


# ------------------------------------------------------------------------------------------------------- VL-BART
BART_POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding reads row position + 2
VISUAL_NORM_LAYOUTS = ("per-projection", "after-sum", "none")


@dataclass
class BartEncoderHyperParameters:
    """What a VL-BART state dict does not say (docs/vl_bart_encoder_spec.md, 'What the shapes give')."""

    num_heads: int
    visual_norm_layout: str = "after-sum"  # per-projection (feat_embedding.1 ...), after-sum (layer_norm), none
    share_vis_lang_layer_norm: bool = False
    scale_embedding: bool = False
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu"  # bart-base: exact erf GELU
    adapter_task: str | None = None
    downsample: int | None = None
    pad_token_id: int = 1


def _layer_norm(x: torch.Tensor, state: Mapping[str, torch.Tensor], prefix: str, eps: float) -> torch.Tensor:
    # torch.nn.LayerNorm by formula: biased variance over the last dimension, then weight and bias
    mean = x.mean(-1, keepdim=True)
    variance = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * state[prefix + "weight"] + state[prefix + "bias"]


def _max_pool_grid(tokens: torch.Tensor, side_out: int) -> torch.Tensor:
    """(B, g*g, C) row-major grid -> (B, s*s, C), nn.AdaptiveMaxPool2d's windows [floor(i g / s), ceil((i+1) g / s))."""
    batch, count, channels = tokens.shape
    side = math.isqrt(count)
    grid = tokens.reshape(batch, side, side, channels)
    cells = []
    for i in range(side_out):
        rows = slice(i * side // side_out, -(-(i + 1) * side // side_out))
        for j in range(side_out):
            cols = slice(j * side // side_out, -(-(j + 1) * side // side_out))
            cells.append(grid[:, rows, cols].amax(dim=(1, 2)))
    return torch.stack(cells, dim=1)


def bart_visual_embedding(
    state: Mapping[str, torch.Tensor],
    visual_feats: torch.Tensor,  # (B, V, feat_dim)
    visual_pos: torch.Tensor,  # (B, V, 4)
    image_order_ids: torch.Tensor,  # (B, V)
    object_order_ids: torch.Tensor,  # (B, V)
    hp: BartEncoderHyperParameters,
) -> torch.Tensor:
    """VL-BART's VisualEmbedding (j-min/VL-T5 `modeling_bart.py` 31-143): LayerNorms with bias, in one of the three
    layouts; obj order rows of the shared table; the VL-T5 area quirk."""
    p = "model.encoder.visual_embedding."
    eps = hp.layer_norm_epsilon
    feat = _linear(visual_feats, state, p + "feat_embedding.0.")
    area = (visual_pos[..., 3] - visual_pos[..., 2]) * (visual_pos[..., 1] - visual_pos[..., 0])
    pos = _linear(torch.cat([visual_pos, area[..., None]], dim=-1), state, p + "absolute_vis_pos_embedding.0.")
    if hp.visual_norm_layout == "per-projection":
        feat = _layer_norm(feat, state, p + "feat_embedding.1.", eps)
        pos = _layer_norm(pos, state, p + "absolute_vis_pos_embedding.1.", eps)
    out = feat + pos
    if p + "img_order_embedding.weight" in state:
        table = state["model.shared.weight"]
        out = out + state[p + "img_order_embedding.weight"][image_order_ids]
        out = out + table[table.shape[0] - 1 - object_order_ids]
    if hp.visual_norm_layout == "after-sum":
        out = _layer_norm(out, state, p + "layer_norm.", eps)
    return out


@torch.no_grad()
def bart_encoder_forward(
    state: Mapping[str, torch.Tensor],
    hp: BartEncoderHyperParameters,
    input_ids: torch.Tensor | None = None,  # (B, L)
    attention_mask: torch.Tensor | None = None,  # (B, L)
    visual_feats: torch.Tensor | None = None,  # (B, V, feat_dim)
    visual_pos: torch.Tensor | None = None,  # (B, V, 4)
    image_order_ids: torch.Tensor | None = None,  # (B, V): with downsampling, two images of V/2 tokens
    object_order_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`last_hidden_state` (B, L + V, d_model) of VL-BART's `JointEncoder` (j-min/VL-T5 `modeling_bart.py` 159-281,
    ylsung/VL_adapter's 589-751 with adapters and `Downsample`) over a state dict in the ORIGINAL layout
    (`model.encoder.*`, `model.shared.weight`, DDP prefix stripped). Eval mode: no dropout."""
    eps = hp.layer_norm_epsilon
    e = "model.encoder."
    shared = state["model.shared.weight"]
    parts, masks = [], []
    if input_ids is not None:
        length = input_ids.shape[1]
        text = shared[input_ids] * (math.sqrt(shared.shape[1]) if hp.scale_embedding else 1.0)
        text = text + state[e + "embed_positions.weight"][torch.arange(length) + BART_POSITION_OFFSET]
        if not hp.share_vis_lang_layer_norm:
            text = _layer_norm(text, state, e + "layernorm_embedding.", eps)
        parts.append(text)
        masks.append((input_ids != hp.pad_token_id).to(shared.dtype) if attention_mask is None
                     else attention_mask.to(shared.dtype))
    if visual_feats is not None:
        batch, count = visual_feats.shape[:2]
        if visual_pos is None:
            visual_pos = torch.zeros(batch, count, 4, dtype=visual_feats.dtype)
        if hp.downsample is not None:
            n = hp.downsample * hp.downsample
            if image_order_ids is None:  # Downsample's 2-tuple: one grid, boxes cut
                visual_feats, visual_pos = _max_pool_grid(visual_feats, hp.downsample), visual_pos[:, :n]
            else:  # its 4-tuple (NLVR2): two halves pooled apart, each image's first n boxes / ids
                halves = [slice(0, count // 2), slice(count // 2, count)]
                visual_feats = torch.cat([_max_pool_grid(visual_feats[:, h], hp.downsample) for h in halves], 1)
                visual_pos = torch.cat([visual_pos[:, h][:, :n] for h in halves], 1)
                image_order_ids = torch.cat([image_order_ids[:, h][:, :n] for h in halves], 1)
                object_order_ids = torch.cat([object_order_ids[:, h][:, :n] for h in halves], 1)
            count = visual_feats.shape[1]
        if image_order_ids is None:
            image_order_ids = torch.zeros(batch, count, dtype=torch.long)
        if object_order_ids is None:
            object_order_ids = torch.arange(count).expand(batch, count)
        visual = bart_visual_embedding(state, visual_feats, visual_pos, image_order_ids, object_order_ids, hp)
        parts.append(visual)
        masks.append(torch.ones(batch, count, dtype=shared.dtype))
    h = torch.cat(parts, dim=1)  # (B, T, d)
    if hp.share_vis_lang_layer_norm:
        h = _layer_norm(h, state, e + "layernorm_embedding.", eps)
    mask = torch.cat(masks, dim=1)  # (B, T)
    inverted = 1.0 - mask
    additive = inverted.masked_fill(inverted.bool(), torch.finfo(h.dtype).min)[:, None, None, :]  # (B, 1, 1, T)
    batch, total, d_model = h.shape
    head_dim = d_model // hp.num_heads
    act = _ACTIVATIONS[hp.activation]
    num_layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(e + "layers."))
    for i in range(num_layers):
        p = f"{e}layers.{i}."
        q = (_linear(h, state, p + "self_attn.q_proj.") * head_dim**-0.5).view(batch, total, hp.num_heads, head_dim)
        k = _linear(h, state, p + "self_attn.k_proj.").view(batch, total, hp.num_heads, head_dim)
        v = _linear(h, state, p + "self_attn.v_proj.").view(batch, total, hp.num_heads, head_dim)
        probs = (torch.einsum("bqhd,bkhd->bhqk", q, k) + additive).softmax(-1)
        out = _linear(torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, total, d_model), state,
                      p + "self_attn.out_proj.")
        if hp.adapter_task is not None:
            out = _adapter(state, f"{p}attn_adapter.adapters.{hp.adapter_task}.", out)
        h = _layer_norm(h + out, state, p + "self_attn_layer_norm.", eps)
        out = _linear(act(_linear(h, state, p + "fc1.")), state, p + "fc2.")
        if hp.adapter_task is not None:
            out = _adapter(state, f"{p}ff_adapter.adapters.{hp.adapter_task}.", out)
        h = _layer_norm(h + out, state, p + "final_layer_norm.", eps)
    return h  # no final norm in BART's encoder
