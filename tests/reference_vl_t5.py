"""An independent, functional re-implementation of the VL-T5 encoder, written from the spec
(`shared/docs/vl_t5_encoder_spec.md`) with plain torch ops on a state dict in the ORIGINAL checkpoint layout
(`encoder.block.{i}.layer.0.SelfAttention.q.weight`, `shared.weight`, ...). It shares no code with the package.

Differences from the package on purpose: the additive mask is -10000 as in the original code, relative buckets are
computed one position at a time with Python's math, attention is written with einsum.
"""

from __future__ import annotations

import math

import torch


def rms_norm(x, weight, eps):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def t5_bucket(relative_position: int, num_buckets: int, max_distance: int) -> int:
    """Bidirectional T5 bucket of one relative position (memory - query), scalar Python math."""
    half = num_buckets // 2
    bucket = half if relative_position > 0 else 0
    n = abs(relative_position)
    max_exact = half // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (half - max_exact))
    return bucket + min(large, half - 1)


def reference_encoder(
    state: dict,
    *,
    num_heads: int,
    eps: float = 1e-6,
    num_buckets: int = 32,
    max_distance: int = 128,
    input_ids=None,
    attention_mask=None,
    visual_feats=None,
    visual_pos=None,
    image_order_ids=None,
    object_order_ids=None,
    individual_vis_layer_norm: bool = True,
    true_area: bool = False,
    downsample: int | None = None,
    adapter_task: str | None = None,
    gated_gelu: bool = False,
    pad_id: int = 0,
):
    """last_hidden_state (B, L + V, d) of the VL-T5 encoder, eval mode, from an original-layout state dict."""
    p = "encoder."
    emb = state["shared.weight"]
    vocab = emb.shape[0]
    parts, masks = [], []
    if input_ids is not None:
        parts.append(emb[input_ids])
        masks.append((input_ids != pad_id).float() if attention_mask is None else attention_mask.float())
    if visual_feats is not None:
        B, V, _ = visual_feats.shape
        if visual_pos is None:
            visual_pos = torch.zeros(B, V, 4)
        if downsample is not None and image_order_ids is not None and object_order_ids is not None:
            # VL-Adapter's Downsample on NLVR2's 4-tuple (ylsung/VL_adapter VL-T5/src/modeling_bart.py 439-462, used
            # by its T5 encoder too): the sequence is chunked in two images, each grid pooled on its own, and boxes,
            # image ids and object ids keep the first downsample**2 tokens of each image
            def halves_to_batch(t):
                return torch.cat(torch.chunk(t, 2, 1), 0)  # (2B, V/2, ...)

            def batch_to_halves(t):
                return torch.cat(torch.chunk(t, 2, 0), 1)  # (B, V, ...)

            x = halves_to_batch(visual_feats)
            grid = int((V // 2) ** 0.5)
            x = x.permute(0, 2, 1).reshape(2 * B, -1, grid, grid)
            x = torch.nn.AdaptiveMaxPool2d(downsample)(x)
            visual_feats = batch_to_halves(x.reshape(2 * B, x.shape[1], -1).permute(0, 2, 1))
            n = downsample * downsample
            visual_pos = batch_to_halves(halves_to_batch(visual_pos)[:, :n])
            image_order_ids = batch_to_halves(halves_to_batch(image_order_ids)[:, :n])
            object_order_ids = batch_to_halves(halves_to_batch(object_order_ids)[:, :n])
            V = 2 * n
        elif downsample is not None:
            grid = int(round(V**0.5))
            x = visual_feats.permute(0, 2, 1).reshape(B, -1, grid, grid)
            x = torch.nn.AdaptiveMaxPool2d(downsample)(x)
            visual_feats = x.reshape(B, x.shape[1], -1).permute(0, 2, 1)
            V = downsample * downsample
            visual_pos = visual_pos[:, :V]
        ve = p + "visual_embedding."
        feat = visual_feats @ state[ve + "feat_embedding.0.weight"].T + state[ve + "feat_embedding.0.bias"]
        b = visual_pos
        if true_area:
            area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
        else:
            area = (b[..., 3] - b[..., 2]) * (b[..., 1] - b[..., 0])
        pos_in = torch.cat([b, area[..., None]], dim=-1)
        pos = pos_in @ state[ve + "absolute_vis_pos_embedding.0.weight"].T + state[ve + "absolute_vis_pos_embedding.0.bias"]
        if individual_vis_layer_norm:
            feat = rms_norm(feat, state[ve + "feat_embedding.1.weight"], eps)
            pos = rms_norm(pos, state[ve + "absolute_vis_pos_embedding.1.weight"], eps)
        if image_order_ids is None:
            image_order_ids = torch.zeros(B, V, dtype=torch.long)
        if object_order_ids is None:
            object_order_ids = torch.arange(V).unsqueeze(0).expand(B, V)
        img = state[ve + "img_order_embedding.weight"][image_order_ids]
        obj = emb[vocab - 1 - object_order_ids]
        visual = ((feat + pos) + img) + obj
        if not individual_vis_layer_norm:
            visual = rms_norm(visual, state[ve + "layer_norm.weight"], eps)
        parts.append(visual)
        masks.append(torch.ones(B, V))
    h = torch.cat(parts, dim=1)
    mask = torch.cat(masks, dim=1)
    B, T, d = h.shape
    L = input_ids.shape[1] if input_ids is not None else 0

    table = state[p + "block.0.layer.0.SelfAttention.relative_attention_bias.weight"]  # (buckets, H)
    bias = torch.zeros(1, num_heads, T, T)
    for i in range(L):
        for j in range(L):
            bias[0, :, i, j] = table[t5_bucket(j - i, num_buckets, max_distance)]
    bias = bias + (1.0 - mask[:, None, None, :]) * -10000.0

    n_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith(p + "block."))
    for i in range(n_layers):
        bp = f"{p}block.{i}.layer."
        x = rms_norm(h, state[bp + "0.layer_norm.weight"], eps)
        q = (x @ state[bp + "0.SelfAttention.q.weight"].T).view(B, T, num_heads, -1)
        k = (x @ state[bp + "0.SelfAttention.k.weight"].T).view(B, T, num_heads, -1)
        v = (x @ state[bp + "0.SelfAttention.v.weight"].T).view(B, T, num_heads, -1)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) + bias
        probs = torch.softmax(scores.float(), dim=-1)
        ctx = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, T, -1)
        out = ctx @ state[bp + "0.SelfAttention.o.weight"].T
        if adapter_task is not None:
            out = _adapter(state, f"{bp}0.attn_adapter.adapters.{adapter_task}.", out)
        h = h + out
        x = rms_norm(h, state[bp + "1.layer_norm.weight"], eps)
        if gated_gelu:
            g = x @ state[bp + "1.DenseReluDense.wi_0.weight"].T
            g = 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3)))
            x = g * (x @ state[bp + "1.DenseReluDense.wi_1.weight"].T)
        else:
            x = torch.clamp(x @ state[bp + "1.DenseReluDense.wi.weight"].T, min=0)
        out = x @ state[bp + "1.DenseReluDense.wo.weight"].T
        if adapter_task is not None:
            out = _adapter(state, f"{bp}1.ff_adapter.adapters.{adapter_task}.", out)
        h = h + out
    return rms_norm(h, state[p + "final_layer_norm.weight"], eps)


def _adapter(state, prefix, z):
    down = z @ state[prefix + "down_sampler.weight"].T + state[prefix + "down_sampler.bias"]
    down = 0.5 * down * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (down + 0.044715 * down**3)))
    return down @ state[prefix + "up_sampler.weight"].T + state[prefix + "up_sampler.bias"] + z
