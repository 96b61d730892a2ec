"""An independent, functional VL-BART joint encoder (VL-T5 paper's BART variant, and VL-Adapter's), written from the
ORIGINAL sources with plain torch ops on a state dict in the ORIGINAL checkpoint layout
(`model.encoder.layers.0.self_attn.q_proj.weight`, `model.shared.weight`, optional `module.` prefix).
It shares no code with the package. Spec: docs/vl_bart_encoder_spec.md.

Sources (line numbers at these commits):
  [T] j-min/VL-T5 a07d779aac8134a587a9e369b6e90f31ef1e6865, VL-T5/src/modeling_bart.py
  [A] ylsung/VL_adapter 545fcbbdbbaec4c442de35567f6ae477ff4e8265, VL-T5/src/modeling_bart.py,
      VL-T5/src/my_transformers/modeling_bart.py ([A/my]), VL-T5/src/adapters/ ([A/ad])
  [H] transformers 4.2.1 (pinned by both), src/transformers/models/bart/modeling_bart.py

Step by step (eval mode: every dropout and layerdrop is off):
 1. text = embed_tokens(input_ids) * embed_scale, embed_scale = sqrt(d_model) if config.scale_embedding else 1.0
    (1.0 for bart-base)                                     [T] 190-191, [H] 626
 2. text += embed_positions.weight[arange(L) + 2]  (learned, offset 2; visual tokens get none)
                                                            [T] 193-195, [H] BartLearnedPositionalEmbedding 105-123
 3. (VL-Adapter, --downsample) raw visual inputs are max-pooled on their square grid (7x7 -> 6x6 adaptive max pool)
    BEFORE the visual embedding; with image_order_ids and object_order_ids given (the NLVR2 4-tuple) the sequence is
    cut in two images, each pooled separately, and boxes / ids are cut to the first n per image
                                                            [A] Downsample 413-470, JointEncoder 637-638
 4. visual = feat + pos + img + obj (left to right), with
      feat = Linear(feat_dim -> d)(visual_feats)            [T] 42/59, 102
      pos  = Linear(5 -> d)(cat[boxes, area]), area = (b3 - b2) * (b1 - b0) (the "(x1, x2, y1, y2)" quirk)
                                                            [T] get_area 74-86, 107-111
      img  = img_order_embedding[image_order_ids]  (default zeros)           [T] 113-117
      obj  = obj_order_embedding[vocab - 1 - object_order_ids]  (default 0..N-1; the shared token table)
                                                            [T] 125-131
    LayerNorm (with bias, eps 1e-5) either per projection (feat_embedding.1 / absolute_vis_pos_embedding.1, when
    individual_vis_layer_norm) or once after the sum (visual_embedding.layer_norm, when not); none without
    use_vis_layer_norm                                      [T] 40-72, 139-141; [A] 105-126, 187-189
 5. share_vis_lang_layer_norm False (every released script): x = cat[layernorm_embedding(text), visual];
    True: x = layernorm_embedding(cat[text, visual])      [T] 211-217, [A] 656-662; text only: [A] 667-668
 6. mask = cat[attention_mask (default input_ids != pad), visual_attention_mask (default ones)], additive:
    (1 - mask) filled with finfo(dtype).min where non-zero  [T] 222-236, [H] _expand_mask 91-102
 7. each of the post-LN BartEncoderLayers                   [H] BartEncoderLayer 260-312, [A/my] 425-519:
      a = out_proj(softmax((q_proj(h) * head_dim**-0.5) k_proj(h)^T + mask) v_proj(h))   [H] BartAttention 126-257
      a = attn_adapter[task](a)                   (VL-Adapter: before the residual)   [A/my] 485-486
      h = self_attn_layer_norm(h + a)
      f = fc2(activation(fc1(h)))                 (bart-base: "gelu" = exact erf GELU in 4.2.1 with torch >= 1.4)
      f = ff_adapter[task](f)                                                          [A/my] 500-501
      h = final_layer_norm(h + f)
      if h has inf/nan: clamp to +-(finfo.max - 1000)  (4.2.1 clamps in any dtype)    [H] 303-305
    Adapter: z -> up_sampler(gelu_new(down_sampler(z))) (+ optional pre/post LayerNorm) + z
                                                            [A/ad] adapter_controller.py 131-155, adapter_modeling.py
                                                            36-58, config.py 10 (non_linearity "gelu_new")
 8. no final encoder norm; output (B, L + V, d_model), text first.

Differences from the original on purpose: attention is written with einsum over a (B, T, heads, head_dim) view,
LayerNorm/GELU by formula, the adaptive max pool by explicit windows; the original cannot run without input_ids
(visual only is its computation with L = 0 text tokens, which it would also give).
"""

from __future__ import annotations

import math

import torch


ENCODER = "model.encoder."
VISUAL = ENCODER + "visual_embedding."
POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding: ids 0 and 1 are never used


# ----------------------------------------------------------------------------------------------- small ops
def strip_ddp_prefix(state: dict) -> dict:
    """Drop DistributedDataParallel's `module.` (what the original utils.load_state_dict does, [T] utils.py:63-71)."""
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def layer_norm(x, weight, bias, eps):
    """torch.nn.LayerNorm by formula: biased variance over the last dim, then affine (weight AND bias)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).pow(2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu(x):
    """Exact GELU: ACT2FN['gelu'] of transformers 4.2.1 is F.gelu (torch >= 1.4)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_new(x):
    """tanh GELU (transformers 'gelu_new'), the adapters' non_linearity ([A/ad] config.py:10)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


ACTIVATIONS = {"gelu": gelu, "gelu_new": gelu_new, "relu": torch.relu, "gelu_tanh": gelu_new}


def linear(x, state, prefix):
    """x W^T + b from `<prefix>weight` (out, in) and `<prefix>bias` (out,), if present."""
    out = x @ state[prefix + "weight"].T
    if prefix + "bias" in state:
        out = out + state[prefix + "bias"]
    return out


def norm(x, state, prefix, eps):
    return layer_norm(x, state[prefix + "weight"], state[prefix + "bias"], eps)


# ------------------------------------------------------------------------------------------ downsampling
def adaptive_max_pool_tokens(tokens, output_side: int):
    """(B, N, C) tokens of a side x side grid (row-major) -> (B, output_side**2, C), as nn.AdaptiveMaxPool2d:
    output cell i covers input rows [floor(i * side / out), ceil((i + 1) * side / out)). For 7 -> 6 every window is
    2 wide and neighbours overlap by one. side = int(N ** 0.5) as [A] 427-430 (N must be a square)."""
    B, N, C = tokens.shape
    side = int(N**0.5)
    if side * side != N:
        raise ValueError(f"{N} visual tokens do not form a square grid; downsampling needs side x side tokens")
    grid = tokens.reshape(B, side, side, C)  # (B, rows, cols, C)
    cells = []
    for i in range(output_side):
        r0, r1 = (i * side) // output_side, -(-((i + 1) * side) // output_side)
        for j in range(output_side):
            c0, c1 = (j * side) // output_side, -(-((j + 1) * side) // output_side)
            cells.append(grid[:, r0:r1, c0:c1, :].amax(dim=(1, 2)))  # (B, C)
    return torch.stack(cells, dim=1)  # (B, out*out, C)


def downsample_visual_inputs(visual_feats, visual_pos, image_order_ids=None, object_order_ids=None, *, output_side):
    """VL-Adapter's Downsample.forward ([A] 439-470) on the raw inputs, before the visual embedding.

    Both id tensors given (NLVR2's 4-tuple `(feats, boxes, img_ids, obj_ids)`): two images of V/2 tokens each; each
    image is pooled on its own grid, and boxes, image_order_ids, object_order_ids keep their first n tokens per image
    (n = output_side**2): image 0's n tokens then image 1's. Neither given (the 2-tuple of VQA, GQA, captioning):
    one grid, boxes cut to the first n (all zeros in VL-Adapter), ids left to their defaults. One of the two: the
    original fails on a 3-tuple (`inputs, boxes = inputs_tuple`); so does this.
    """
    n = output_side * output_side
    if image_order_ids is None and object_order_ids is None:
        return adaptive_max_pool_tokens(visual_feats, output_side), visual_pos[:, :n], None, None
    if image_order_ids is None or object_order_ids is None:
        raise ValueError("downsampling takes both image_order_ids and object_order_ids (two images) or neither")
    half = visual_feats.shape[1] // 2

    def per_image(t, pool=False):  # t: (B, V, ...) -> image 0 then image 1, each cut (or pooled) to n tokens
        first, second = t[:, :half], t[:, half:]
        if pool:
            return torch.cat(
                [adaptive_max_pool_tokens(first, output_side), adaptive_max_pool_tokens(second, output_side)], 1
            )
        return torch.cat([first[:, :n], second[:, :n]], dim=1)

    return (
        per_image(visual_feats, pool=True),  # (B, 2n, feat_dim)
        per_image(visual_pos),  # (B, 2n, 4)
        per_image(image_order_ids),  # (B or 1, 2n)
        per_image(object_order_ids),  # (B or 1, 2n)
    )


# -------------------------------------------------------------------------------------- visual embedding
def box_area_input(visual_pos):
    """The 5th input of the box projection: (b[...,3] - b[...,2]) * (b[...,1] - b[...,0]) ([T] get_area 74-86, whose
    docstring calls boxes (x1, x2, y1, y2)). With the loaders' (x1, y1, x2, y2) boxes this is (y2 - x2) * (y1 - x1),
    not the area; checkpoints were trained with it. All zeros for VL-Adapter's CLIP grids (boxes are zeros)."""
    b = visual_pos
    return (b[..., 3] - b[..., 2]) * (b[..., 1] - b[..., 0])


def visual_embedding(
    state,
    visual_feats,
    visual_pos,
    image_order_ids=None,
    object_order_ids=None,
    *,
    individual_vis_layer_norm: bool,
    use_vis_layer_norm: bool = True,
    use_vis_order_embedding: bool = True,
    eps: float = 1e-5,
):
    """(B, V, d) visual tokens, VisualEmbedding.forward ([T] 88-143 = [A] 142-191). `state` without `module.`."""
    B, V, _ = visual_feats.shape
    if visual_pos.shape != (B, V, 4):
        raise ValueError(f"visual_pos must be {(B, V, 4)}, got {tuple(visual_pos.shape)}")  # the original asserts
    per_projection = use_vis_layer_norm and individual_vis_layer_norm
    feat = linear(visual_feats, state, VISUAL + "feat_embedding.0.")  # (B, V, d)
    if per_projection:
        feat = norm(feat, state, VISUAL + "feat_embedding.1.", eps)
    pos_in = torch.cat([visual_pos, box_area_input(visual_pos).unsqueeze(-1)], dim=-1)  # (B, V, 5)
    pos = linear(pos_in, state, VISUAL + "absolute_vis_pos_embedding.0.")  # (B, V, d)
    if per_projection:
        pos = norm(pos, state, VISUAL + "absolute_vis_pos_embedding.1.", eps)
    if use_vis_order_embedding:
        if image_order_ids is None:
            image_order_ids = torch.zeros(1, V, dtype=torch.long)  # [T] 114-116: (1, V), broadcast over B
        if object_order_ids is None:
            object_order_ids = torch.arange(V).unsqueeze(0)  # [T] 125-127
        table = state.get(VISUAL + "obj_order_embedding.weight", state.get("model.shared.weight"))  # (vocab, d)
        img = state[VISUAL + "img_order_embedding.weight"][image_order_ids]  # (B|1, V, d)
        obj = table[table.shape[0] - 1 - object_order_ids]  # (B|1, V, d): rows of <vis_extra_id_k>
        visual = feat + pos + img + obj  # [T] 133-134, summed left to right
    else:
        visual = feat + pos
    if use_vis_layer_norm and not individual_vis_layer_norm:
        visual = norm(visual, state, VISUAL + "layer_norm.", eps)
    return visual


# --------------------------------------------------------------------------------------------- adapters
def adapter(state, prefix, z, activation=gelu_new, eps: float = 1e-5):
    """AdapterController.forward ([A/ad] adapter_controller.py:131-155) for `<layer>.<attn|ff>_adapter.` + task:
    up_sampler(act(down_sampler(pre_ln?(z)))), then post_ln? , plus z (the un-normalised input)."""
    controller, task = prefix.rsplit(".adapters.", 1)
    x = norm(z, state, controller + ".pre_layer_norm.", eps) if controller + ".pre_layer_norm.weight" in state else z
    out = linear(activation(linear(x, state, f"{prefix}down_sampler.")), state, f"{prefix}up_sampler.")
    if controller + ".post_layer_norm.weight" in state:
        out = norm(out, state, controller + ".post_layer_norm.", eps)
    return out + z


# ----------------------------------------------------------------------------------------------- encoder
def reference_vl_bart_encoder(
    state: dict,
    *,
    num_heads: int,
    input_ids=None,
    attention_mask=None,
    visual_feats=None,
    visual_pos=None,
    image_order_ids=None,
    object_order_ids=None,
    visual_attention_mask=None,
    individual_vis_layer_norm: bool = False,
    use_vis_layer_norm: bool = True,
    use_vis_order_embedding: bool = True,
    share_vis_lang_layer_norm: bool = False,
    scale_embedding: bool = False,
    downsample: int | None = None,
    adapter_task: str | None = None,
    activation: str = "gelu",
    adapter_activation: str = "gelu_new",
    layer_norm_eps: float = 1e-5,
    pad_id: int = 1,
    dtype: torch.dtype | None = None,
):
    """last_hidden_state (B, L + V, d_model) of the VL-BART joint encoder in eval mode.

    state: original-layout dict (VLBart.state_dict(), `module.` optional); num_heads from the backbone config
    (bart-base 12: no tensor records it). individual_vis_layer_norm=False is VL-BART's released layout
    (visual_embedding.layer_norm); VL-Adapter's scripts keep True (feat_embedding.1 / absolute_vis_pos_embedding.1).
    downsample: output grid side (6 for VL-Adapter's --downsample with n_boxes 36). adapter_task: the VL-Adapter task
    whose adapters run (e.g. 'vqa'). dtype: cast every floating tensor (e.g. torch.float64); None keeps the state's.
    """
    state = strip_ddp_prefix(state)
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
        visual_feats = None if visual_feats is None else visual_feats.to(dtype)
        visual_pos = None if visual_pos is None else visual_pos.to(dtype)
    shared = state.get(ENCODER + "embed_tokens.weight", state.get("model.shared.weight"))  # (vocab, d)
    compute_dtype = shared.dtype
    d = shared.shape[1]
    eps = layer_norm_eps
    if d % num_heads:
        raise ValueError(f"d_model {d} is not divisible by num_heads {num_heads}")
    if input_ids is None and visual_feats is None:
        raise ValueError("give input_ids, visual_feats or both")

    # 1-2. text tokens: scaled token embedding + learned positions (offset 2)
    if input_ids is not None:
        B, L = input_ids.shape
        positions = state[ENCODER + "embed_positions.weight"]  # (max_pos + 2, d)
        if L + POSITION_OFFSET > positions.shape[0]:
            raise ValueError(f"{L} text tokens but only {positions.shape[0] - POSITION_OFFSET} learned positions")
        embed_scale = math.sqrt(d) if scale_embedding else 1.0
        text = shared[input_ids] * embed_scale + positions[torch.arange(L) + POSITION_OFFSET]  # (B, L, d)
        text_mask = (input_ids != pad_id) if attention_mask is None else attention_mask
    else:
        B, L = visual_feats.shape[0], 0
        text = torch.zeros(B, 0, d, dtype=compute_dtype)
        text_mask = torch.zeros(B, 0)

    # 3-5. visual tokens, then layernorm_embedding (on text, or on everything when shared)
    ln_emb = ENCODER + "layernorm_embedding."
    if visual_feats is not None:
        if visual_pos is None:
            visual_pos = torch.zeros(*visual_feats.shape[:2], 4, dtype=visual_feats.dtype)
        if downsample is not None:
            visual_feats, visual_pos, image_order_ids, object_order_ids = downsample_visual_inputs(
                visual_feats, visual_pos, image_order_ids, object_order_ids, output_side=downsample
            )
        visual = visual_embedding(
            state,
            visual_feats,
            visual_pos,
            image_order_ids,
            object_order_ids,
            individual_vis_layer_norm=individual_vis_layer_norm,
            use_vis_layer_norm=use_vis_layer_norm,
            use_vis_order_embedding=use_vis_order_embedding,
            eps=eps,
        ).expand(B, -1, -1)  # (B, V, d)
        V = visual.shape[1]
        if share_vis_lang_layer_norm:
            h = norm(torch.cat([text, visual], dim=1), state, ln_emb, eps)  # (B, L + V, d)
        else:
            h = torch.cat([norm(text, state, ln_emb, eps), visual], dim=1)  # (B, L + V, d)
        visual_mask = torch.ones(B, V) if visual_attention_mask is None else visual_attention_mask
    else:
        h = norm(text, state, ln_emb, eps)  # (B, L, d)
        visual_mask = torch.zeros(B, 0)

    # 6. additive mask as transformers 4.2.1's _expand_mask: 0 where attended, finfo(dtype).min elsewhere
    mask = torch.cat([text_mask.to(compute_dtype), visual_mask.to(compute_dtype)], dim=1)  # (B, T)
    inverted = 1.0 - mask
    additive = inverted.masked_fill(inverted != 0, torch.finfo(compute_dtype).min)  # (B, T)
    additive = additive[:, None, None, :]  # (B, 1, 1, T): same for every head and query

    # 7. post-LN encoder layers
    act, adapter_act = ACTIVATIONS[activation], ACTIVATIONS[adapter_activation]
    n_layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(ENCODER + "layers."))
    T = h.shape[1]
    head_dim = d // num_heads
    for i in range(n_layers):
        lp = f"{ENCODER}layers.{i}."
        q = (linear(h, state, lp + "self_attn.q_proj.") * head_dim**-0.5).view(B, T, num_heads, head_dim)
        k = linear(h, state, lp + "self_attn.k_proj.").view(B, T, num_heads, head_dim)
        v = linear(h, state, lp + "self_attn.v_proj.").view(B, T, num_heads, head_dim)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) + additive  # (B, heads, T, T)
        probs = torch.softmax(scores, dim=-1)  # (B, heads, T, T)
        context = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, T, d)  # (B, T, d)
        attn = linear(context, state, lp + "self_attn.out_proj.")  # (B, T, d)
        if adapter_task is not None:
            attn = adapter(state, f"{lp}attn_adapter.adapters.{adapter_task}.", attn, adapter_act, eps)
        h = norm(h + attn, state, lp + "self_attn_layer_norm.", eps)
        ff = linear(act(linear(h, state, lp + "fc1.")), state, lp + "fc2.")  # (B, T, d)
        if adapter_task is not None:
            ff = adapter(state, f"{lp}ff_adapter.adapters.{adapter_task}.", ff, adapter_act, eps)
        h = norm(h + ff, state, lp + "final_layer_norm.", eps)
        if not torch.isfinite(h).all():  # [H] 303-305: fp16 overflow guard, applied in any dtype
            limit = torch.finfo(h.dtype).max - 1000
            h = torch.clamp(h, min=-limit, max=limit)
    return h  # (B, L + V, d): no final encoder norm
