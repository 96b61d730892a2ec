"""JointEncoderModel against an independent functional VL-T5 encoder and against transformers' T5EncoderModel."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import randomize_, tiny_config_kwargs
from reference_vl_t5 import reference_encoder
from transformers import AutoConfig, AutoModel, T5Config, T5EncoderModel

from vl_joint_encoder import JointEncoderConfig, JointEncoderModel


ATOL = 1e-5


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    model = JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs(**overrides)))
    return randomize_(model, seed=seed).eval()


def original_layout(model, task="vqa"):
    """Our state dict in the original VL-T5 checkpoint layout (what the reference reads)."""
    state = {}
    for key, value in model.state_dict().items():
        if key == "shared.weight":
            state[key] = value
        elif ".adapter." in key:
            block, rest = key.split(".adapter.")
            kind = "attn_adapter" if block.endswith("layer.0") else "ff_adapter"
            state[f"encoder.{block}.{kind}.adapters.{task}.{rest}"] = value
        else:
            state["encoder." + key] = value
    return state


def reference(model, **inputs):
    config = model.config
    return reference_encoder(
        original_layout(model),
        num_heads=config.num_heads,
        eps=config.layer_norm_epsilon,
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
        individual_vis_layer_norm=config.individual_vis_layer_norm,
        true_area=config.box_area == "xyxy",
        downsample=config.visual_downsample_size,
        adapter_task="vqa" if config.adapter_reduction_factor else None,
        gated_gelu=config.is_gated_act,
        **inputs,
    )


def text_batch(batch=2, length=9, vocab=99, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab - 20, (batch, length), generator=generator)
    input_ids[:, -1] = 1  # </s>
    input_ids[1, -3:] = 0  # padding on the second row
    return input_ids


def visual_batch(batch=2, tokens=5, feat_dim=16, seed=2):
    generator = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, tokens, feat_dim, generator=generator)
    xy1 = torch.rand(batch, tokens, 2, generator=generator) * 0.5
    xy2 = xy1 + torch.rand(batch, tokens, 2, generator=generator) * 0.5
    boxes = torch.cat([xy1, xy2], dim=-1)
    return feats, boxes


@torch.no_grad()
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"individual_vis_layer_norm": False},
        {"box_area": "xyxy"},
        {"feed_forward_proj": "gated-gelu"},
    ],
    ids=["vl-t5", "vl-bart-norm", "true-area", "gated-gelu"],
)
def test_one_image_matches_reference(overrides):
    model = build(**overrides)
    input_ids = text_batch()
    feats, boxes = visual_batch()
    out = model(input_ids=input_ids, visual_feats=feats, visual_pos=boxes).last_hidden_state
    expected = reference(model, input_ids=input_ids, visual_feats=feats, visual_pos=boxes)
    assert out.shape == (2, 9 + 5, 32)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_two_images_with_order_ids_matches_reference():
    model = build(seed=3)
    input_ids = text_batch(seed=4)
    feats, boxes = visual_batch(tokens=8, seed=5)
    image_order_ids = torch.tensor([[0] * 4 + [1] * 4] * 2)
    object_order_ids = torch.tensor([list(range(4)) * 2] * 2)
    out = model(
        input_ids=input_ids, visual_feats=feats, visual_pos=boxes,
        image_order_ids=image_order_ids, object_order_ids=object_order_ids,
    ).last_hidden_state
    expected = reference(
        model, input_ids=input_ids, visual_feats=feats, visual_pos=boxes,
        image_order_ids=image_order_ids, object_order_ids=object_order_ids,
    )
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    # the order ids really matter: defaults give another output
    default = model(input_ids=input_ids, visual_feats=feats, visual_pos=boxes).last_hidden_state
    assert (default - out).abs().max() > 1e-3


@torch.no_grad()
def test_zero_boxes_and_missing_boxes_match_reference():
    model = build(seed=6)
    input_ids = text_batch(seed=7)
    feats, _ = visual_batch(seed=8)
    zeros = torch.zeros(2, 5, 4)
    expected = reference(model, input_ids=input_ids, visual_feats=feats, visual_pos=zeros)
    torch.testing.assert_close(
        model(input_ids=input_ids, visual_feats=feats, visual_pos=zeros).last_hidden_state, expected, atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        model(input_ids=input_ids, visual_feats=feats).last_hidden_state, expected, atol=ATOL, rtol=0
    )


@torch.no_grad()
def test_padded_text_with_explicit_mask_matches_reference():
    model = build(seed=9)
    input_ids = text_batch(length=12, seed=10)
    attention_mask = (input_ids != 0).long()
    attention_mask[0, 8:] = 0  # mask real tokens too: the mask, not the pad id, decides
    feats, boxes = visual_batch(seed=11)
    out = model(input_ids=input_ids, attention_mask=attention_mask, visual_feats=feats, visual_pos=boxes)
    expected = reference(model, input_ids=input_ids, attention_mask=attention_mask, visual_feats=feats, visual_pos=boxes)
    torch.testing.assert_close(out.last_hidden_state, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_adapters_and_grid_downsampling_match_reference():
    model = build(seed=12, adapter_reduction_factor=4, visual_downsample_size=6)
    input_ids = text_batch(seed=13)
    feats = torch.randn(2, 49, 16)  # a 7x7 CLIP grid
    out = model(input_ids=input_ids, visual_feats=feats, visual_pos=torch.zeros(2, 49, 4)).last_hidden_state
    assert out.shape == (2, 9 + 36, 32)
    expected = reference(model, input_ids=input_ids, visual_feats=feats, visual_pos=torch.zeros(2, 49, 4))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_two_images_with_downsampling_pool_each_grid_matches_reference():
    """VL-Adapter's NLVR2 model: two 7x7 grids, each max-pooled to 6x6 on its own (98 -> 72 tokens), then each
    image's boxes and order ids cut to its first 36 (reference: the original Downsample's 4-tuple path)."""
    model = build(seed=27, adapter_reduction_factor=4, visual_downsample_size=6)
    input_ids = text_batch(seed=28)
    generator = torch.Generator().manual_seed(29)
    feats = torch.randn(2, 98, 16, generator=generator)
    boxes = torch.rand(2, 98, 4, generator=generator)  # distinct boxes, to see which ones are kept
    image_order_ids = torch.tensor([[0] * 49 + [1] * 49] * 2)
    object_order_ids = torch.tensor([list(range(49)) * 2] * 2)
    inputs = dict(input_ids=input_ids, visual_feats=feats, visual_pos=boxes, image_order_ids=image_order_ids,
                  object_order_ids=object_order_ids)
    out = model(**inputs).last_hidden_state
    assert out.shape == (2, 9 + 72, 32)
    torch.testing.assert_close(out, reference(model, **inputs), atol=ATOL, rtol=0)
    # the mask is cut per image too: masking image 1 (the second block) removes its 36 pooled tokens
    mask = torch.tensor([[1] * 98, [1] * 49 + [0] * 49])
    masked = model(**inputs, visual_attention_mask=mask)
    assert masked.attention_mask[:, 9:].sum(-1).tolist() == [72, 36]
    with pytest.raises(ValueError, match="token 49 of row 0 has image_order_ids 0, expected 1"):
        model(**{**inputs, "image_order_ids": torch.zeros(2, 98, dtype=torch.long)})


@torch.no_grad()
def test_visual_only_input_matches_reference():
    model = build(seed=14)
    feats, boxes = visual_batch(seed=15)
    out = model(visual_feats=feats, visual_pos=boxes)
    torch.testing.assert_close(
        out.last_hidden_state, reference(model, visual_feats=feats, visual_pos=boxes), atol=ATOL, rtol=0
    )
    assert out.pooler_output.shape == (2, 32)


def _t5_and_ours(feed_forward_proj="relu", seed=0, attn="eager"):
    kwargs = tiny_config_kwargs(feed_forward_proj=feed_forward_proj, attn_implementation=attn)
    t5_config = T5Config(
        vocab_size=kwargs["vocab_size"], d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
        feed_forward_proj=feed_forward_proj, attn_implementation=attn,
    )
    torch.manual_seed(seed)
    t5 = T5EncoderModel(t5_config)
    randomize_(t5, seed=seed).eval()
    ours = JointEncoderModel(JointEncoderConfig(**kwargs)).eval()
    mapped = {}
    for key, value in t5.state_dict().items():
        if key == "shared.weight":
            mapped[key] = value
        elif key.startswith("encoder.") and key != "encoder.embed_tokens.weight":
            mapped[key[len("encoder."):]] = value
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert unexpected == []
    assert all(k.startswith("visual_embedding.") for k in missing), missing
    return t5, ours


@torch.no_grad()
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_text_only_equals_transformers_t5_encoder(feed_forward_proj, attn):
    t5, ours = _t5_and_ours(feed_forward_proj, attn=attn)
    assert t5.config._attn_implementation == attn and ours.config._attn_implementation == attn
    input_ids = text_batch(length=11)
    expected = t5(input_ids=input_ids, attention_mask=(input_ids != 0).long()).last_hidden_state
    got = ours(input_ids=input_ids).last_hidden_state
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_padding_and_batch_invariance():
    model = build(seed=16)
    ids_a = torch.tensor([[5, 6, 7, 1]])
    ids_b = torch.tensor([[8, 9, 10, 11, 12, 13, 1]])
    feats, boxes = visual_batch(batch=2, seed=17)
    alone_a = model(input_ids=ids_a, visual_feats=feats[:1], visual_pos=boxes[:1]).pooler_output
    alone_b = model(input_ids=ids_b, visual_feats=feats[1:], visual_pos=boxes[1:]).pooler_output
    batch_ids = torch.zeros(2, 7, dtype=torch.long)
    batch_ids[0, :4] = ids_a
    batch_ids[1] = ids_b
    visual_mask = torch.ones(2, 6, dtype=torch.long)
    visual_mask[:, 5] = 0  # one padded visual token per row
    padded_feats = torch.cat([feats, torch.randn(2, 1, 16) * 100], dim=1)
    padded_boxes = torch.cat([boxes, torch.rand(2, 1, 4)], dim=1)
    batched = model(
        input_ids=batch_ids, visual_feats=padded_feats, visual_pos=padded_boxes, visual_attention_mask=visual_mask
    ).pooler_output
    torch.testing.assert_close(batched[0], alone_a[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(batched[1], alone_b[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_pooling_modes_by_hand():
    input_ids = text_batch()
    feats, boxes = visual_batch()
    for pooling in ("mean", "text_mean", "visual_mean", "first"):
        model = build(seed=18, pooling=pooling, normalize=False)
        out = model(input_ids=input_ids, visual_feats=feats, visual_pos=boxes)
        h, mask = out.last_hidden_state, torch.cat([(input_ids != 0).long(), torch.ones(2, 5, dtype=torch.long)], 1)
        for row in range(2):
            if pooling == "first":
                expected = h[row, 0]
            else:
                keep = mask[row].bool().clone()
                if pooling == "text_mean":
                    keep[9:] = False
                if pooling == "visual_mean":
                    keep[:9] = False
                expected = h[row][keep].mean(0)
            torch.testing.assert_close(out.pooler_output[row], expected, atol=ATOL, rtol=0)
    projected = build(seed=19, projection_dim=12, normalize=True)
    out = projected(input_ids=input_ids, visual_feats=feats, visual_pos=boxes).pooler_output
    assert out.shape == (2, 12)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2), atol=1e-6, rtol=0)


def test_similarity_dot_and_cosine_by_hand():
    q, p = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    model = build(similarity="dot", logit_scale=1.0)
    torch.testing.assert_close(model.similarity(q, p), torch.tensor([[3.0, 8.0]]))
    model = build(similarity="cosine", logit_scale=20.0)
    torch.testing.assert_close(model.similarity(q, p), torch.tensor([[0.6, 0.8]]))
    torch.testing.assert_close(model.similarity(q, p, scale=True), torch.tensor([[12.0, 16.0]]))


@torch.no_grad()
def test_tied_token_and_object_order_embedding_saved_once(tmp_path):
    model = build(seed=20)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    embedding_like = [k for k in keys if f"{model.config.vocab_size}" and k.endswith("weight") and "shared" in k]
    assert embedding_like == ["shared.weight"]
    assert not any("obj_order" in k for k in keys)
    # changing the token embedding row of <vis_extra_id_0> changes the first visual token
    feats, boxes = visual_batch(batch=1)
    before = model(visual_feats=feats, visual_pos=boxes).last_hidden_state
    model.shared.weight[model.config.vocab_size - 1] += 1.0
    after = model(visual_feats=feats, visual_pos=boxes).last_hidden_state
    assert (after - before).abs().max() > 1e-3


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    model = build(seed=21, projection_dim=8, adapter_reduction_factor=4)
    input_ids = text_batch()
    feats, boxes = visual_batch()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "vl_joint_encoder"
    assert config["auto_map"]["AutoModel"] == "modeling_joint_encoder.JointEncoderModel"
    assert (tmp_path / "modeling_joint_encoder.py").exists()
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, JointEncoderModel)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), JointEncoderConfig)
    a = model(input_ids=input_ids, visual_feats=feats, visual_pos=boxes)
    b = reloaded(input_ids=input_ids, visual_feats=feats, visual_pos=boxes)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=0, rtol=0)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=0, rtol=0)


def test_remote_code_round_trip_without_the_package(tmp_path):
    model = build(seed=22, projection_dim=8)
    model.save_pretrained(tmp_path / "model")
    input_ids = text_batch()
    feats, boxes = visual_batch()
    with torch.no_grad():
        expected = model(input_ids=input_ids, visual_feats=feats, visual_pos=boxes).pooler_output
    torch.save({"input_ids": input_ids, "feats": feats, "boxes": boxes, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path = [p for p in sys.path if p not in ("", {os.getcwd()!r})]
        sys.modules["vl_joint_encoder"] = None  # any import of the package now fails
        try:
            import vl_joint_encoder
            raise SystemExit("the package is importable: the test would prove nothing")
        except ImportError:
            pass
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        with torch.no_grad():
            out = model(input_ids=io["input_ids"], visual_feats=io["feats"], visual_pos=io["boxes"]).pooler_output
        print("MAXDIFF", float((out - io["expected"]).abs().max()))
        """
    )
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    max_diff = float(result.stdout.split("MAXDIFF")[1])
    assert max_diff == 0.0


@torch.no_grad()
def test_eager_and_sdpa_agree():
    torch.manual_seed(23)
    kwargs = tiny_config_kwargs()
    eager = JointEncoderModel(JointEncoderConfig(**kwargs, attn_implementation="eager"))
    randomize_(eager, seed=23).eval()
    sdpa = JointEncoderModel(JointEncoderConfig(**kwargs, attn_implementation="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    input_ids = text_batch()
    feats, boxes = visual_batch()
    a = eager(input_ids=input_ids, visual_feats=feats, visual_pos=boxes).last_hidden_state
    b = sdpa(input_ids=input_ids, visual_feats=feats, visual_pos=boxes).last_hidden_state
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    # attentions are returned (through the eager path) even with sdpa
    attentions = sdpa(input_ids=input_ids, visual_feats=feats, output_attentions=True).attentions
    assert len(attentions) == 2 and attentions[0].shape == (2, 4, 14, 14)
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(2, 4, 14), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention: backward needs a GPU, and on CPU its compile takes ~20 s")
@torch.no_grad()
def test_flex_attention_agrees_with_eager():
    """The bias (relative positions on text x text, and the padding mask) goes to flex_attention as a score_mod
    through transformers' attention registry. (Checked on CPU without gradients once: max diff 1.7e-6.)"""
    torch.manual_seed(23)
    kwargs = tiny_config_kwargs()
    eager = randomize_(JointEncoderModel(JointEncoderConfig(**kwargs, attn_implementation="eager")), seed=23)
    eager = eager.cuda().eval()
    flex = JointEncoderModel(JointEncoderConfig(**kwargs, attn_implementation="flex_attention")).cuda().eval()
    flex.load_state_dict(eager.state_dict())
    input_ids = text_batch().cuda()
    feats, boxes = (t.cuda() for t in visual_batch())
    a = eager(input_ids=input_ids, visual_feats=feats, visual_pos=boxes).last_hidden_state
    b = flex(input_ids=input_ids, visual_feats=feats, visual_pos=boxes).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    input_ids = text_batch()
    feats, boxes = visual_batch()

    def grads(checkpointing):
        model = build(seed=24, adapter_reduction_factor=4)
        model.train()  # dropout is 0, so train mode is deterministic
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert all(block.gradient_checkpointing for block in model.block)
        out = model(input_ids=input_ids, visual_feats=feats, visual_pos=boxes).pooler_output
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@torch.no_grad()
def test_bf16_autocast_and_bf16_weights_run():
    model = build(seed=25)
    input_ids = text_batch()
    feats, boxes = visual_batch()
    reference_out = model(input_ids=input_ids, visual_feats=feats, visual_pos=boxes).pooler_output
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_out = model(input_ids=input_ids, visual_feats=feats, visual_pos=boxes).pooler_output
    assert torch.isfinite(autocast_out).all()
    assert torch.nn.functional.cosine_similarity(autocast_out.float(), reference_out).min() > 0.98
    bf16_out = model.to(torch.bfloat16)(input_ids=input_ids, visual_feats=feats, visual_pos=boxes).pooler_output
    assert bf16_out.dtype == torch.bfloat16 and torch.isfinite(bf16_out).all()
    assert torch.nn.functional.cosine_similarity(bf16_out.float(), reference_out).min() > 0.98


def test_dropout_is_active_in_train_mode_only():
    model = build(seed=26, dropout_rate=0.3)
    input_ids = text_batch()
    model.train()
    a, b = model(input_ids=input_ids).last_hidden_state, model(input_ids=input_ids).last_hidden_state
    assert (a - b).abs().max() > 1e-4
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).last_hidden_state,
                                   model(input_ids=input_ids).last_hidden_state, atol=0, rtol=0)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(visual_feats=torch.randn(2, 5, 7)), "expects 16 (config.feat_dim)"),
        (dict(visual_pos=torch.rand(2, 5, 4)), "visual_pos given without visual_feats"),
        (dict(visual_feats=torch.randn(2, 5, 16), visual_pos=torch.rand(2, 4, 4)), "visual_pos covers"),
        (dict(visual_feats=torch.randn(2, 5, 16), visual_pos=torch.rand(2, 5, 5)), "boxes (x1, y1, x2, y2)"),
        (dict(visual_feats=torch.randn(2, 5, 16), image_order_ids=torch.full((2, 5), 2)), "image_order_ids must be in"),
        (dict(input_ids=torch.tensor([[5, 99]])), "vocabulary has 99 entries"),
        (dict(input_ids=torch.tensor([[5, 6]]), attention_mask=torch.ones(1, 3)), "attention_mask has shape"),
        (dict(visual_feats=torch.randn(2, 5, 16), visual_attention_mask=torch.ones(2, 4)), "visual_attention_mask must"),
        (dict(input_ids=torch.tensor([[5, 6]]), visual_feats=torch.randn(2, 5, 16)), "batch size"),
        (dict(), "give input_ids, visual_feats"),
        (dict(pixel_values=torch.randn(1, 3, 32, 32)), "no vision tower"),
    ],
)
def test_bad_inputs_raise_clear_errors(bad, message):
    model = build()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model(**bad)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(pooling="max"), "pooling must be one of"),
        (dict(similarity="l2"), "similarity must be one of"),
        (dict(logit_scale=0), "logit_scale must be a positive"),
        (dict(box_area="whatever"), "box_area must be one of"),
        (dict(num_heads=0), "num_heads must be a positive integer"),
        (dict(feed_forward_proj="gated-foo"), "feed_forward_proj"),
        (dict(relative_attention_num_buckets=7), "must be even"),
        (dict(pos_dim=5), "pos_dim must be 4"),
        (dict(projection_dim=-3), "projection_dim must be a positive integer or None"),
        (dict(pad_token_id=500), "pad_token_id"),
        (dict(vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "num_attention_heads": 4}),
         "feat_dim \\(16\\) must equal"),
    ],
)
def test_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        JointEncoderConfig(**tiny_config_kwargs(**bad))


def test_config_defaults_are_the_released_vl_t5_shape():
    config = JointEncoderConfig()
    assert (config.vocab_size, config.d_model, config.num_layers, config.num_heads, config.d_kv, config.d_ff) == (
        32200, 768, 12, 12, 64, 3072
    )
    assert (config.feat_dim, config.n_images, config.box_area, config.layer_norm_epsilon) == (2048, 2, "vl_t5", 1e-6)
    assert config.hidden_size == 768 and config.num_attention_heads == 12 and config.num_hidden_layers == 12
