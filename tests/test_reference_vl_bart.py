"""Tests of the VL-BART reference itself (tests/reference_vl_bart.py) and of its fixtures (tests/vl_bart_fixtures.py).

Each check compares against something independent of the reference: transformers' own BartEncoder (text), its
BartEncoderLayer stack fed the joint sequence, plain-Python hand computations (visual tokens, a one-token encoder),
torch's adaptive max pool, or a property (a masked token is a removed token). Seconds in all.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from reference_vl_bart import (
    adapter,
    adaptive_max_pool_tokens,
    box_area_input,
    downsample_visual_inputs,
    reference_vl_bart_encoder,
    strip_ddp_prefix,
    visual_embedding,
)
from transformers import BartConfig, BartModel
from vl_bart_fixtures import (
    BASE_VOCAB_SIZE,
    SHARED_ALIASES,
    TINY,
    VL_ADAPTER_TASKS,
    VOCAB_SIZE,
    bart_config_kwargs,
    build_tiny_bart_tokenizer,
    encoder_keys,
    extra_tokens,
    save_checkpoint,
    vl_adapter_bart_state_dict,
    vl_bart_state_dict,
)


HEADS = TINY["num_heads"]
D = TINY["d_model"]
FP32_ATOL = 1e-5
FP64_ATOL = 1e-12


# ------------------------------------------------------------------------------------------------ helpers
def text_inputs(seed=3, batch=2, length=9):
    """<s> ... </s> then right padding (pad = 1), as the BART collators build them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, BASE_VOCAB_SIZE, (batch, length), generator=g)
    ids[:, 0] = 0
    ids[0, -1] = 2
    ids[1, -4] = 2
    ids[1, -3:] = 1  # three pads
    return ids


def visual_inputs(seed=5, batch=2, tokens=4, feat_dim=TINY["feat_dim"]):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, tokens, feat_dim, generator=g) * 2.0
    xy1 = torch.rand(batch, tokens, 2, generator=g) * 0.5
    boxes = torch.cat([xy1, xy1 + torch.rand(batch, tokens, 2, generator=g) * 0.5], dim=-1)  # (x1, y1, x2, y2)
    return feats, boxes


def transformers_encoder(state, dtype=torch.float32, **config_overrides):
    """transformers' BartModel(...).encoder (eager attention, eval) holding the fixture's encoder weights."""
    config = BartConfig(**bart_config_kwargs(**config_overrides))
    config._attn_implementation = "eager"
    encoder = BartModel(config).encoder.eval()
    bare = strip_ddp_prefix(state)
    weights = {
        k[len("model.encoder.") :]: v
        for k, v in bare.items()
        if k.startswith("model.encoder.") and ".visual_embedding." not in k and "_adapter." not in k
    }
    encoder.load_state_dict(weights, strict=True)
    return encoder.to(dtype)


def transformers_layers(encoder, hidden, mask):
    """Run transformers' BartEncoderLayer stack on a given joint sequence (B, T, d) with a 2-D 0/1 mask (B, T)."""
    additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min  # (B, 1, 1, T)
    additive = additive.expand(-1, 1, hidden.shape[1], -1)  # (B, 1, T, T)
    for layer in encoder.layers:
        hidden = layer(hidden, additive)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


def text_embeddings(encoder, input_ids):
    """transformers' own text embedding: embed_tokens (scaled) + embed_positions, before layernorm_embedding."""
    return encoder.embed_tokens(input_ids) + encoder.embed_positions(input_ids)


# Plain-Python maths for hand computations (lists of floats; no torch).
def py(t):
    return t.tolist()


def py_linear(weight, bias, x):
    return [sum(w * xi for w, xi in zip(row, x)) + b for row, b in zip(weight, bias)]


def py_layer_norm(x, weight, bias, eps=1e-5):
    mean = sum(x) / len(x)
    var = sum((xi - mean) ** 2 for xi in x) / len(x)
    return [(xi - mean) / math.sqrt(var + eps) * w + b for xi, w, b in zip(x, weight, bias)]


def py_gelu(x):
    return [0.5 * xi * (1.0 + math.erf(xi / math.sqrt(2.0))) for xi in x]


def py_gelu_new(x):
    return [0.5 * xi * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (xi + 0.044715 * xi**3))) for xi in x]


def add(*vectors):
    return [sum(values) for values in zip(*vectors)]


def py_visual_token(s, feat, box, image_id, object_id, individual):
    """One visual token embedding, by hand (VisualEmbedding.forward for one token)."""
    v = "model.encoder.visual_embedding."
    f = py_linear(py(s[v + "feat_embedding.0.weight"]), py(s[v + "feat_embedding.0.bias"]), feat)
    area = (box[3] - box[2]) * (box[1] - box[0])  # the original's get_area on (x1, y1, x2, y2) boxes
    p = py_linear(
        py(s[v + "absolute_vis_pos_embedding.0.weight"]), py(s[v + "absolute_vis_pos_embedding.0.bias"]), box + [area]
    )
    if individual:
        f = py_layer_norm(f, py(s[v + "feat_embedding.1.weight"]), py(s[v + "feat_embedding.1.bias"]))
        p = py_layer_norm(
            p, py(s[v + "absolute_vis_pos_embedding.1.weight"]), py(s[v + "absolute_vis_pos_embedding.1.bias"])
        )
    img = py(s[v + "img_order_embedding.weight"][image_id])
    obj = py(s["model.shared.weight"][VOCAB_SIZE - 1 - object_id])
    total = add(f, p, img, obj)
    if not individual:
        total = py_layer_norm(total, py(s[v + "layer_norm.weight"]), py(s[v + "layer_norm.bias"]))
    return total


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.mark.parametrize("variant", ["vl_bart", "vl_adapter", "vl_adapter_single"])
def test_fixture_file_loads_back_with_weights_only_and_keeps_the_aliases(tmp_path, variant):
    if variant == "vl_bart":
        state = vl_bart_state_dict(answer_head=True)
    else:
        state = vl_adapter_bart_state_dict(use_single_adapter=variant.endswith("single"))
    path = save_checkpoint(state, tmp_path / "snap" / "LAST.pth")
    loaded = torch.load(path, weights_only=True, map_location="cpu")
    assert list(loaded) == list(state) and all(k.startswith("module.") for k in loaded)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    shared = loaded["module.model.shared.weight"]
    assert shared.shape == (VOCAB_SIZE, D)
    for alias in SHARED_ALIASES:  # one tensor, five names, still one storage after loading
        assert loaded["module." + alias].untyped_storage().data_ptr() == shared.untyped_storage().data_ptr()
    assert torch.equal(loaded["module.final_logits_bias"], torch.zeros(1, VOCAB_SIZE))
    assert loaded["module.model.encoder.embed_positions.weight"].shape == (TINY["max_position_embeddings"] + 2, D)
    assert any(k.startswith("module.model.decoder.layers.1.encoder_attn.") for k in loaded)
    v = "module.model.encoder.visual_embedding."
    if variant == "vl_bart":  # one LayerNorm after the sum, with bias
        assert loaded[v + "layer_norm.bias"].shape == (D,) and v + "feat_embedding.1.weight" not in loaded
        assert "module.answer_head.3.weight" in loaded
    else:  # one LayerNorm per projection; adapters per task, r = 8 -> 4 hidden units
        assert v + "layer_norm.weight" not in loaded and loaded[v + "absolute_vis_pos_embedding.1.bias"].shape == (D,)
        for task in VL_ADAPTER_TASKS:
            for kind in ("attn_adapter", "ff_adapter"):
                p = f"module.model.encoder.layers.1.{kind}.adapters.{task}."
                assert loaded[p + "down_sampler.weight"].shape == (D // 8, D)
                assert loaded[p + "up_sampler.weight"].shape == (D, D // 8)
                assert loaded[p + "up_sampler.bias"].shape == (D,)
            assert f"module.model.decoder.layers.0.enc_attn_adapter.adapters.{task}.down_sampler.bias" in loaded
        a = "module.model.encoder.layers.0.attn_adapter.adapters."
        same = loaded[a + "vqa.down_sampler.weight"].data_ptr() == loaded[a + "nlvr.down_sampler.weight"].data_ptr()
        assert same == variant.endswith("single")
    n_layer = 16 + (32 if variant != "vl_bart" else 0)  # 16 BART tensors + 4 tasks x 2 adapters x 4
    n_visual = 8 if variant == "vl_bart" else 10  # 2 Linear + (1 or 2 LayerNorms) + obj alias + img table
    assert len(encoder_keys(loaded)) == 1 + 2 + 2 * n_layer + 2 + n_visual  # shared, tokens+positions, ln_emb


def test_tiny_tokenizer_has_bart_ids_and_the_200_tokens_in_original_order(tmp_path):
    tokenizer = build_tiny_bart_tokenizer()
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert tokenizer.mask_token_id == BASE_VOCAB_SIZE - 1 and len(tokenizer) == VOCAB_SIZE
    assert tokenizer.convert_ids_to_tokens(list(range(BASE_VOCAB_SIZE, VOCAB_SIZE))) == extra_tokens()
    assert tokenizer.convert_tokens_to_ids("<extra_id_99>") == BASE_VOCAB_SIZE
    for k in (0, 3, 99):  # the object-order row of object k is the row of <vis_extra_id_k>
        assert tokenizer.convert_tokens_to_ids(f"<vis_extra_id_{k}>") == VOCAB_SIZE - 1 - k
    ids = tokenizer("a photo of a cat").input_ids
    assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids
    tokenizer.save_pretrained(tmp_path)
    again = type(tokenizer).from_pretrained(tmp_path)
    assert len(again) == VOCAB_SIZE and again("a photo of a cat").input_ids == ids


# --------------------------------------------------------------------------------------------- text only
@pytest.mark.parametrize("scale_embedding", [False, True])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, FP32_ATOL), (torch.float64, FP64_ATOL)])
@pytest.mark.parametrize("source", ["vl_bart", "vl_adapter"])
def test_text_only_equals_transformers_bart_encoder(scale_embedding, dtype, atol, source):
    state = vl_bart_state_dict() if source == "vl_bart" else vl_adapter_bart_state_dict()
    encoder = transformers_encoder(state, dtype, scale_embedding=scale_embedding)
    input_ids = text_inputs()
    with torch.no_grad():
        expected = encoder(input_ids=input_ids, attention_mask=(input_ids != 1).long()).last_hidden_state
    got = reference_vl_bart_encoder(
        state, num_heads=HEADS, input_ids=input_ids, scale_embedding=scale_embedding, dtype=dtype
    )
    assert got.dtype == dtype and got.shape == (2, 9, D)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def test_explicit_attention_mask_overrides_the_pad_rule():
    state = vl_bart_state_dict()
    encoder = transformers_encoder(state)
    input_ids = text_inputs()
    mask = torch.ones_like(input_ids)
    mask[0, 5:] = 0  # not where the pads are
    with torch.no_grad():
        expected = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    got = reference_vl_bart_encoder(state, num_heads=HEADS, input_ids=input_ids, attention_mask=mask)
    torch.testing.assert_close(got, expected, atol=FP32_ATOL, rtol=0)


class _ThenAdapter(torch.nn.Module):
    """Wraps transformers' out_proj / fc2 so that the adapter runs right after it, before dropout and the residual:
    where VL-Adapter's BartEncoderLayer calls attn_adapter / ff_adapter."""

    def __init__(self, projection, state, prefix):
        super().__init__()
        self.projection, self.state, self.prefix = projection, state, prefix

    def forward(self, x):
        return adapter(self.state, self.prefix, self.projection(x))


@pytest.mark.parametrize("task", ["vqa", "nlvr"])
@pytest.mark.parametrize("adapter_norms", [False, True])
def test_adapters_sit_after_out_proj_and_fc2_before_the_residual(task, adapter_norms):
    norms = dict(adapter_layer_norm_before=adapter_norms, adapter_layer_norm_after=adapter_norms)
    state = vl_adapter_bart_state_dict(**norms)
    bare = strip_ddp_prefix(state)
    encoder = transformers_encoder(state)
    for i, layer in enumerate(encoder.layers):
        lp = f"model.encoder.layers.{i}."
        layer.self_attn.out_proj = _ThenAdapter(layer.self_attn.out_proj, bare, f"{lp}attn_adapter.adapters.{task}.")
        layer.fc2 = _ThenAdapter(layer.fc2, bare, f"{lp}ff_adapter.adapters.{task}.")
    input_ids = text_inputs()
    with torch.no_grad():
        expected = encoder(input_ids=input_ids, attention_mask=(input_ids != 1).long()).last_hidden_state
    got = reference_vl_bart_encoder(state, num_heads=HEADS, input_ids=input_ids, adapter_task=task)
    torch.testing.assert_close(got, expected, atol=FP32_ATOL, rtol=0)
    plain = reference_vl_bart_encoder(state, num_heads=HEADS, input_ids=input_ids)
    assert (got - plain).abs().max() > 1e-2  # the adapters do something


def test_one_adapter_by_hand_and_tasks_differ_unless_single():
    state = strip_ddp_prefix(vl_adapter_bart_state_dict())
    z = torch.randn(D, generator=torch.Generator().manual_seed(1))
    p = "model.encoder.layers.0.ff_adapter.adapters.gqa."
    down = py_gelu_new(py_linear(py(state[p + "down_sampler.weight"]), py(state[p + "down_sampler.bias"]), py(z)))
    by_hand = add(py_linear(py(state[p + "up_sampler.weight"]), py(state[p + "up_sampler.bias"]), down), py(z))
    torch.testing.assert_close(adapter(state, p, z), torch.tensor(by_hand), atol=1e-5, rtol=0)
    ids = text_inputs()
    outs = {
        t: reference_vl_bart_encoder(state, num_heads=HEADS, input_ids=ids, adapter_task=t) for t in ("vqa", "gqa")
    }
    assert (outs["vqa"] - outs["gqa"]).abs().max() > 1e-2
    single = vl_adapter_bart_state_dict(use_single_adapter=True)
    outs = {
        t: reference_vl_bart_encoder(single, num_heads=HEADS, input_ids=ids, adapter_task=t) for t in VL_ADAPTER_TASKS
    }
    assert all(torch.equal(outs["vqa"], outs[t]) for t in VL_ADAPTER_TASKS)


# -------------------------------------------------------------------------------------- visual embedding
@pytest.mark.parametrize("individual", [False, True])
def test_one_visual_token_embedding_by_hand(individual):
    state = strip_ddp_prefix(vl_bart_state_dict(individual_vis_layer_norm=individual))
    feats, boxes = visual_inputs(batch=1, tokens=3)
    got = visual_embedding(
        state, feats, boxes, torch.tensor([[0, 0, 1]]), torch.tensor([[0, 1, 7]]), individual_vis_layer_norm=individual
    )
    for token, (image_id, object_id) in enumerate([(0, 0), (0, 1), (1, 7)]):
        by_hand = py_visual_token(state, py(feats[0, token]), py(boxes[0, token]), image_id, object_id, individual)
        torch.testing.assert_close(got[0, token], torch.tensor(by_hand), atol=1e-5, rtol=0)


def test_area_input_is_the_original_quirk_not_the_box_area():
    box = torch.tensor([[[0.1, 0.2, 0.5, 0.9]]])  # (x1, y1, x2, y2): true area 0.4 * 0.7 = 0.28
    assert box_area_input(box).item() == pytest.approx((0.9 - 0.5) * (0.2 - 0.1))  # 0.04
    # through the embedding: no norm, no order embedding, a box projection reading only the 5th input
    state = strip_ddp_prefix(vl_bart_state_dict(use_vis_layer_norm=False, use_vis_order_embedding=False))
    v = "model.encoder.visual_embedding."
    state[v + "absolute_vis_pos_embedding.0.weight"] = torch.zeros(D, 5)
    state[v + "absolute_vis_pos_embedding.0.weight"][0, 4] = 1.0
    state[v + "absolute_vis_pos_embedding.0.bias"] = torch.zeros(D)
    state[v + "feat_embedding.0.weight"] = torch.zeros(D, TINY["feat_dim"])
    state[v + "feat_embedding.0.bias"] = torch.zeros(D)
    out = visual_embedding(
        state,
        torch.ones(1, 1, TINY["feat_dim"]),
        box,
        individual_vis_layer_norm=False,
        use_vis_layer_norm=False,
        use_vis_order_embedding=False,
    )
    assert out[0, 0, 0].item() == pytest.approx(0.04) and out[0, 0, 1:].abs().max() == 0


def test_default_order_ids_are_image_zero_and_objects_in_order():
    state = vl_bart_state_dict()
    feats, boxes = visual_inputs(tokens=5)
    ids = text_inputs()
    default = reference_vl_bart_encoder(state, num_heads=HEADS, input_ids=ids, visual_feats=feats, visual_pos=boxes)
    explicit = reference_vl_bart_encoder(
        state,
        num_heads=HEADS,
        input_ids=ids,
        visual_feats=feats,
        visual_pos=boxes,
        image_order_ids=torch.zeros(2, 5, dtype=torch.long),
        object_order_ids=torch.arange(5).expand(2, 5),
    )
    torch.testing.assert_close(default, explicit, atol=0, rtol=0)
    other = reference_vl_bart_encoder(
        state,
        num_heads=HEADS,
        input_ids=ids,
        visual_feats=feats,
        visual_pos=boxes,
        image_order_ids=torch.ones(1, 5, dtype=torch.long),
    )
    assert (other - default).abs().max() > 1e-2


def test_object_order_rows_are_the_vis_extra_token_rows():
    tokenizer = build_tiny_bart_tokenizer()
    state = strip_ddp_prefix(vl_bart_state_dict(use_vis_layer_norm=False))
    v = "model.encoder.visual_embedding."
    for key in ("feat_embedding.0.", "absolute_vis_pos_embedding.0."):  # zero projections: only the order rows
        state[v + key + "weight"] = torch.zeros_like(state[v + key + "weight"])
        state[v + key + "bias"] = torch.zeros(D)
    feats, boxes = visual_inputs(batch=1, tokens=2)
    out = visual_embedding(
        state, feats, boxes, None, torch.tensor([[3, 42]]), individual_vis_layer_norm=False, use_vis_layer_norm=False
    )
    img0 = state[v + "img_order_embedding.weight"][0]
    for token, k in enumerate((3, 42)):
        row = tokenizer.convert_tokens_to_ids(f"<vis_extra_id_{k}>")
        torch.testing.assert_close(out[0, token], state["model.shared.weight"][row] + img0, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ the joint encoder
@pytest.mark.parametrize("individual", [False, True])
@pytest.mark.parametrize("share_vis_lang_layer_norm", [False, True])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, FP32_ATOL), (torch.float64, FP64_ATOL)])
def test_joint_sequence_equals_transformers_layers_on_the_concatenation(
    individual, share_vis_lang_layer_norm, dtype, atol
):
    """text through transformers' embeddings + layernorm_embedding, visual tokens from the (hand-checked) visual
    embedding, concatenated text first, masked (pads and one visual token), then transformers' layer stack."""
    state = vl_bart_state_dict(individual_vis_layer_norm=individual)
    encoder = transformers_encoder(state, dtype)
    input_ids = text_inputs()
    feats, boxes = visual_inputs(tokens=4)
    visual_mask = torch.ones(2, 4)
    visual_mask[1, 2] = 0
    with torch.no_grad():
        text = text_embeddings(encoder, input_ids)  # (B, L, d)
        visual = visual_embedding(
            {k: v.to(dtype) for k, v in strip_ddp_prefix(state).items()},
            feats.to(dtype),
            boxes.to(dtype),
            individual_vis_layer_norm=individual,
        )  # (B, V, d)
        if share_vis_lang_layer_norm:
            hidden = encoder.layernorm_embedding(torch.cat([text, visual], dim=1))
        else:
            hidden = torch.cat([encoder.layernorm_embedding(text), visual], dim=1)
        mask = torch.cat([(input_ids != 1).to(dtype), visual_mask.to(dtype)], dim=1)
        expected = transformers_layers(encoder, hidden, mask)
    got = reference_vl_bart_encoder(
        state,
        num_heads=HEADS,
        input_ids=input_ids,
        visual_feats=feats,
        visual_pos=boxes,
        visual_attention_mask=visual_mask,
        individual_vis_layer_norm=individual,
        share_vis_lang_layer_norm=share_vis_lang_layer_norm,
        dtype=dtype,
    )
    assert got.shape == (2, 9 + 4, D)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def test_one_visual_token_alone_through_the_encoder_by_hand():
    """Visual only, one token: attention over one key is out_proj(v_proj(x)), so the whole encoder is a short chain
    of plain-Python maths (layernorm_embedding does not touch visual tokens)."""
    state = strip_ddp_prefix(vl_bart_state_dict())
    feats, boxes = visual_inputs(batch=1, tokens=1)
    x = py_visual_token(state, py(feats[0, 0]), py(boxes[0, 0]), 0, 0, individual=False)
    for i in range(TINY["encoder_layers"]):
        lp = f"model.encoder.layers.{i}."

        def lin(name, vector, lp=lp):
            return py_linear(py(state[lp + name + ".weight"]), py(state[lp + name + ".bias"]), vector)

        attn = lin("self_attn.out_proj", lin("self_attn.v_proj", x))
        x = py_layer_norm(
            add(x, attn), py(state[lp + "self_attn_layer_norm.weight"]), py(state[lp + "self_attn_layer_norm.bias"])
        )
        ff = lin("fc2", py_gelu(lin("fc1", x)))
        x = py_layer_norm(
            add(x, ff), py(state[lp + "final_layer_norm.weight"]), py(state[lp + "final_layer_norm.bias"])
        )
    got = reference_vl_bart_encoder(state, num_heads=HEADS, visual_feats=feats, visual_pos=boxes, dtype=torch.float64)
    assert got.shape == (1, 1, D)
    torch.testing.assert_close(got[0, 0], torch.tensor(x, dtype=torch.float64), atol=1e-10, rtol=0)


def test_a_masked_token_is_a_removed_token():
    state = vl_bart_state_dict()
    input_ids = text_inputs()[:1, :7]  # no pads
    feats, boxes = visual_inputs(batch=1, tokens=5)
    keep = [0, 1, 3, 4]
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]])
    kwargs = dict(num_heads=HEADS, input_ids=input_ids, dtype=torch.float64)
    masked = reference_vl_bart_encoder(
        state, visual_feats=feats, visual_pos=boxes, visual_attention_mask=mask, **kwargs
    )
    removed = reference_vl_bart_encoder(
        state, visual_feats=feats[:, keep], visual_pos=boxes[:, keep], object_order_ids=torch.tensor([keep]), **kwargs
    )
    rows = list(range(7)) + [7 + k for k in keep]
    torch.testing.assert_close(masked[:, rows], removed, atol=1e-10, rtol=0)
    padded = torch.cat([input_ids, torch.ones(1, 2, dtype=torch.long)], dim=1)  # two pads at the end of the text
    with_pads = reference_vl_bart_encoder(
        state, num_heads=HEADS, input_ids=padded, visual_feats=feats, visual_pos=boxes, dtype=torch.float64
    )
    without = reference_vl_bart_encoder(state, visual_feats=feats, visual_pos=boxes, **kwargs)
    torch.testing.assert_close(with_pads[:, list(range(7)) + list(range(9, 14))], without, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------ downsampling
def test_adaptive_max_pool_windows_7_to_6():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 49, 3, generator=g)  # a 7 x 7 grid, row-major
    pooled = adaptive_max_pool_tokens(tokens, 6)  # (2, 36, 3)
    grid = tokens.reshape(2, 7, 7, 3)
    # windows of 7 -> 6: [0,2) [1,3) [2,4) [3,5) [4,6) [5,7)
    for i, j in [(0, 0), (2, 3), (5, 5), (3, 1)]:
        torch.testing.assert_close(pooled[:, 6 * i + j], grid[:, i : i + 2, j : j + 2].amax(dim=(1, 2)))
    torch_pool = F.adaptive_max_pool2d(tokens.permute(0, 2, 1).reshape(2, 3, 7, 7), (6, 6))  # (2, 3, 6, 6)
    torch.testing.assert_close(pooled, torch_pool.reshape(2, 3, 36).permute(0, 2, 1), atol=0, rtol=0)


def test_two_images_are_pooled_separately_and_ids_cut_per_image():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 98, TINY["feat_dim"], generator=g)  # NLVR2: two 7 x 7 CLIP grids per example
    boxes = torch.zeros(2, 98, 4)
    image_ids = torch.tensor([0] * 49 + [1] * 49).expand(2, -1)
    object_ids = torch.arange(49).repeat(2).expand(2, -1)
    pooled, pos, img, obj = downsample_visual_inputs(feats, boxes, image_ids, object_ids, output_side=6)
    assert pooled.shape == (2, 72, TINY["feat_dim"]) and pos.shape == (2, 72, 4)
    torch.testing.assert_close(pooled[:, :36], adaptive_max_pool_tokens(feats[:, :49], 6), atol=0, rtol=0)
    torch.testing.assert_close(pooled[:, 36:], adaptive_max_pool_tokens(feats[:, 49:], 6), atol=0, rtol=0)
    assert img.tolist() == [[0] * 36 + [1] * 36] * 2 and obj.tolist() == [list(range(36)) * 2] * 2
    state = vl_adapter_bart_state_dict()
    ids = text_inputs()
    kwargs = dict(num_heads=HEADS, input_ids=ids, individual_vis_layer_norm=True, adapter_task="nlvr")
    got = reference_vl_bart_encoder(
        state,
        visual_feats=feats,
        visual_pos=boxes,
        image_order_ids=image_ids,
        object_order_ids=object_ids,
        downsample=6,
        **kwargs,
    )
    pre_pooled = reference_vl_bart_encoder(
        state, visual_feats=pooled, visual_pos=pos, image_order_ids=img, object_order_ids=obj, **kwargs
    )
    assert got.shape == (2, 9 + 72, D)
    torch.testing.assert_close(got, pre_pooled, atol=0, rtol=0)


def test_single_image_downsample_keeps_default_ids_and_refuses_half_a_tuple():
    state = vl_adapter_bart_state_dict()
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 49, TINY["feat_dim"], generator=g)
    kwargs = dict(num_heads=HEADS, input_ids=text_inputs(), individual_vis_layer_norm=True, adapter_task="vqa")
    got = reference_vl_bart_encoder(state, visual_feats=feats, downsample=6, **kwargs)
    expected = reference_vl_bart_encoder(state, visual_feats=adaptive_max_pool_tokens(feats, 6), **kwargs)
    assert got.shape == (2, 9 + 36, D)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="both image_order_ids and object_order_ids"):
        reference_vl_bart_encoder(
            state, visual_feats=feats, downsample=6, image_order_ids=torch.zeros(1, 49, dtype=torch.long), **kwargs
        )


# ---------------------------------------------------------------------------------------------- the rest
def test_prefix_is_optional_and_too_long_text_is_refused():
    state = vl_bart_state_dict()
    ids = text_inputs()
    torch.testing.assert_close(
        reference_vl_bart_encoder(state, num_heads=HEADS, input_ids=ids),
        reference_vl_bart_encoder(strip_ddp_prefix(state), num_heads=HEADS, input_ids=ids),
        atol=0,
        rtol=0,
    )
    too_long = torch.full((1, TINY["max_position_embeddings"] + 1), 5)
    with pytest.raises(ValueError, match="learned positions"):
        reference_vl_bart_encoder(state, num_heads=HEADS, input_ids=too_long)
