"""JointEncoderModel with backbone="bart" against the independent functional VL-BART encoder
(tests/reference_vl_bart.py, written from the original sources and run on state dicts in the ORIGINAL checkpoint
layout, tests/vl_bart_fixtures.py) and, on text alone, against transformers' BartModel encoder."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from reference_vl_bart import reference_vl_bart_encoder, strip_ddp_prefix
from transformers import AutoModel, BartConfig, BartModel
from vl_bart_fixtures import (
    BASE_VOCAB_SIZE,
    TINY,
    VOCAB_SIZE,
    bart_config_kwargs,
    vl_adapter_bart_state_dict,
    vl_bart_state_dict,
)

from vl_joint_encoder import JointEncoderConfig, JointEncoderModel


ATOL = 1e-5
HEADS = TINY["num_heads"]
SHARED_ALIASES = {
    "model.encoder.embed_tokens.weight",
    "model.encoder.visual_embedding.obj_order_embedding.weight",
}


def config_for(state, **overrides):
    """Our config for a fixture state dict (sizes as in vl_bart_fixtures.TINY), dropout off."""
    bare = strip_ddp_prefix(state)
    v = "model.encoder.visual_embedding."
    kwargs = dict(
        backbone="bart",
        vocab_size=VOCAB_SIZE,
        d_model=TINY["d_model"],
        d_ff=TINY["ffn_dim"],
        num_layers=TINY["encoder_layers"],
        num_heads=HEADS,
        max_position_embeddings=TINY["max_position_embeddings"],
        feat_dim=TINY["feat_dim"],
        n_images=TINY["n_images"],
        dropout_rate=0.0,
        use_vis_order_embedding=v + "img_order_embedding.weight" in bare,
        use_vis_layer_norm=v + "layer_norm.weight" in bare or v + "feat_embedding.1.weight" in bare,
        individual_vis_layer_norm=v + "layer_norm.weight" not in bare,
    )
    kwargs.update(overrides)
    return JointEncoderConfig(**kwargs)


def ours_from_original(state, task=None, **overrides):
    """Our model holding an original-layout VLBart state dict: written here key by key from the spec's key table
    (model.encoder.X -> X, model.shared.weight -> shared.weight, the task's adapters -> attn_adapter / ff_adapter),
    loaded strictly (only a new projection head may be missing)."""
    bare = strip_ddp_prefix(state)
    if task is not None:
        tasks = {k.split(".adapters.")[1].split(".")[0] for k in bare if ".adapters." in k}
        overrides.setdefault("adapter_reduction_factor", TINY["d_model"] // bare[
            f"model.encoder.layers.0.attn_adapter.adapters.{sorted(tasks)[0]}.down_sampler.weight"].shape[0])
    model = JointEncoderModel(config_for(state, **overrides)).eval()
    mapped = {"shared.weight": bare["model.shared.weight"]}
    for key, value in bare.items():
        if not key.startswith("model.encoder.") or key in SHARED_ALIASES:
            continue
        key = key[len("model.encoder."):]
        if ".adapters." in key:
            if f".adapters.{task}." not in key:
                continue
            key = key.replace(f".adapters.{task}.", ".")
        mapped[key] = value
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected and all(k.startswith("projection.") for k in missing), (missing, unexpected)
    return model


def reference(state, **kwargs):
    bare = strip_ddp_prefix(state)
    v = "model.encoder.visual_embedding."
    kwargs.setdefault("individual_vis_layer_norm", v + "layer_norm.weight" not in bare)
    kwargs.setdefault("use_vis_layer_norm", v + "layer_norm.weight" in bare or v + "feat_embedding.1.weight" in bare)
    kwargs.setdefault("use_vis_order_embedding", v + "img_order_embedding.weight" in bare)
    return reference_vl_bart_encoder(state, num_heads=HEADS, **kwargs)


def text_batch(seed=1, batch=2, length=9):
    """<s> ... </s>, right-padded with 1, as the VL-BART collators build them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, BASE_VOCAB_SIZE, (batch, length), generator=g)
    ids[:, 0] = 0
    ids[0, -1] = 2
    ids[1, -4] = 2
    ids[1, -3:] = 1
    return ids


def visual_batch(seed=2, batch=2, tokens=5, feat_dim=TINY["feat_dim"]):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, tokens, feat_dim, generator=g) * 2.0
    xy1 = torch.rand(batch, tokens, 2, generator=g) * 0.5
    boxes = torch.cat([xy1, xy1 + torch.rand(batch, tokens, 2, generator=g) * 0.5], dim=-1)
    return feats, boxes


def joint(model, **inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


# ------------------------------------------------------------------------------------------- against the reference
LAYOUTS = {
    "vl-bart-released (one norm after the sum)": dict(individual_vis_layer_norm=False),
    "per-projection norms (VL-Adapter)": dict(individual_vis_layer_norm=True),
    "no visual norm": dict(use_vis_layer_norm=False),
    "no order embedding": dict(individual_vis_layer_norm=False, use_vis_order_embedding=False),
}


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_one_image_matches_reference_for_each_norm_layout(layout):
    state = vl_bart_state_dict(seed=3, **LAYOUTS[layout])
    model = ours_from_original(state)
    ids = text_batch()
    feats, boxes = visual_batch()
    out = joint(model, input_ids=ids, visual_feats=feats, visual_pos=boxes)
    assert out.shape == (2, 9 + 5, TINY["d_model"])
    torch.testing.assert_close(out, reference(state, input_ids=ids, visual_feats=feats, visual_pos=boxes),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("flag", ["share_vis_lang_layer_norm", "scale_embedding"])
def test_shared_language_norm_and_scaled_embedding_match_reference(flag):
    state = vl_bart_state_dict(seed=4)
    model = ours_from_original(state, **{flag: True})
    ids = text_batch(seed=5)
    feats, boxes = visual_batch(seed=6)
    out = joint(model, input_ids=ids, visual_feats=feats, visual_pos=boxes)
    torch.testing.assert_close(
        out, reference(state, input_ids=ids, visual_feats=feats, visual_pos=boxes, **{flag: True}), atol=ATOL, rtol=0
    )
    plain = reference(state, input_ids=ids, visual_feats=feats, visual_pos=boxes)
    assert (out - plain).abs().max() > 1e-3  # the flag changes the computation


def test_two_images_with_order_ids_match_reference():
    state = vl_bart_state_dict(seed=7)
    model = ours_from_original(state)
    ids = text_batch(seed=8)
    feats, boxes = visual_batch(seed=9, tokens=8)
    image_order_ids = torch.tensor([[0] * 4 + [1] * 4] * 2)
    object_order_ids = torch.tensor([list(range(4)) * 2] * 2)
    inputs = dict(input_ids=ids, visual_feats=feats, visual_pos=boxes, image_order_ids=image_order_ids,
                  object_order_ids=object_order_ids)
    out = joint(model, **inputs)
    torch.testing.assert_close(out, reference(state, **inputs), atol=ATOL, rtol=0)
    default = joint(model, input_ids=ids, visual_feats=feats, visual_pos=boxes)
    assert (default - out).abs().max() > 1e-3  # the ids matter


def test_masked_boxes_zero_boxes_and_missing_boxes_match_reference():
    state = vl_bart_state_dict(seed=10)
    model = ours_from_original(state)
    ids = text_batch(seed=11)
    feats, boxes = visual_batch(seed=12, tokens=6)
    visual_attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    masked = dict(input_ids=ids, visual_feats=feats, visual_pos=boxes, visual_attention_mask=visual_attention_mask)
    torch.testing.assert_close(joint(model, **masked), reference(state, **masked), atol=ATOL, rtol=0)
    zeros = torch.zeros_like(boxes)
    expected = reference(state, input_ids=ids, visual_feats=feats, visual_pos=zeros)
    torch.testing.assert_close(joint(model, input_ids=ids, visual_feats=feats, visual_pos=zeros), expected,
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(joint(model, input_ids=ids, visual_feats=feats), expected, atol=ATOL, rtol=0)


def test_padded_text_default_and_explicit_mask_match_reference():
    state = vl_bart_state_dict(seed=13)
    model = ours_from_original(state)
    ids = text_batch(seed=14, length=12)
    feats, boxes = visual_batch(seed=15)
    # default: input_ids != pad (1), as the original encoder derives it (no trainer passes a mask)
    torch.testing.assert_close(joint(model, input_ids=ids, visual_feats=feats, visual_pos=boxes),
                               reference(state, input_ids=ids, visual_feats=feats, visual_pos=boxes), atol=ATOL, rtol=0)
    mask = (ids != 1).long()
    mask[0, 7:] = 0  # mask real tokens too: the mask decides
    inputs = dict(input_ids=ids, attention_mask=mask, visual_feats=feats, visual_pos=boxes)
    torch.testing.assert_close(joint(model, **inputs), reference(state, **inputs), atol=ATOL, rtol=0)


def test_adapters_with_downsampling_match_reference():
    state = vl_adapter_bart_state_dict(seed=16)  # vqa/gqa/nlvr/caption adapters, r = 8, per-projection norms
    model = ours_from_original(state, task="gqa", visual_downsample_size=6)
    assert model.config.adapter_reduction_factor == 8
    ids = text_batch(seed=17)
    feats = visual_batch(seed=18, tokens=49)[0]  # a 7x7 CLIP grid
    zeros = torch.zeros(2, 49, 4)  # VL-Adapter feeds zero boxes
    out = joint(model, input_ids=ids, visual_feats=feats, visual_pos=zeros)
    assert out.shape == (2, 9 + 36, TINY["d_model"])
    expected = reference(state, input_ids=ids, visual_feats=feats, visual_pos=zeros, downsample=6, adapter_task="gqa")
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    other_task = reference(state, input_ids=ids, visual_feats=feats, visual_pos=zeros, downsample=6, adapter_task="vqa")
    assert (out - other_task).abs().max() > 1e-3


def test_two_images_with_downsampling_pool_each_grid_match_reference():
    """VL-Adapter's NLVR2 model: two 7x7 grids, each max-pooled to 6x6 on its own (98 -> 72 tokens)."""
    state = vl_adapter_bart_state_dict(seed=19)
    model = ours_from_original(state, task="nlvr", visual_downsample_size=6)
    ids = text_batch(seed=20)
    feats = visual_batch(seed=21, tokens=98)[0]
    inputs = dict(
        input_ids=ids, visual_feats=feats, visual_pos=torch.zeros(2, 98, 4),
        image_order_ids=torch.tensor([[0] * 49 + [1] * 49] * 2), object_order_ids=torch.tensor([list(range(49)) * 2] * 2),
    )
    out = joint(model, **inputs)
    assert out.shape == (2, 9 + 72, TINY["d_model"])
    torch.testing.assert_close(out, reference(state, downsample=6, adapter_task="nlvr", **inputs), atol=ATOL, rtol=0)
    # pooling the 98 tokens as one grid is impossible, so is guessing the images without their ids
    with pytest.raises(ValueError, match="pass image_order_ids"):
        joint(model, input_ids=ids, visual_feats=feats)


def test_visual_only_matches_reference():
    state = vl_bart_state_dict(seed=22)
    model = ours_from_original(state)
    feats, boxes = visual_batch(seed=23)
    torch.testing.assert_close(joint(model, visual_feats=feats, visual_pos=boxes),
                               reference(state, visual_feats=feats, visual_pos=boxes), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------- against transformers
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("scale_embedding", [False, True])
def test_text_only_equals_transformers_bart_encoder(attn, scale_embedding):
    state = vl_bart_state_dict(seed=24)
    config = BartConfig(**bart_config_kwargs(scale_embedding=scale_embedding), attn_implementation=attn)
    bart = BartModel(config).eval()
    bare = strip_ddp_prefix(state)
    bart.encoder.load_state_dict(
        {k[len("model.encoder."):]: v for k, v in bare.items()
         if k.startswith("model.encoder.") and ".visual_embedding." not in k}, strict=True
    )
    ours = ours_from_original(state, scale_embedding=scale_embedding, attn_implementation=attn)
    assert ours.config._attn_implementation == attn == bart.config._attn_implementation
    ids = text_batch(seed=25, length=11)
    with torch.no_grad():
        expected = bart.encoder(input_ids=ids, attention_mask=(ids != 1).long()).last_hidden_state
        got = ours(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_eager_and_sdpa_agree_and_attentions_are_returned():
    state = vl_adapter_bart_state_dict(seed=26)
    eager = ours_from_original(state, task="vqa", attn_implementation="eager")
    sdpa = ours_from_original(state, task="vqa", attn_implementation="sdpa")
    ids = text_batch(seed=27)
    feats, boxes = visual_batch(seed=28)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5])
    inputs = dict(input_ids=ids, visual_feats=feats, visual_pos=boxes, visual_attention_mask=mask)
    torch.testing.assert_close(joint(eager, **inputs), joint(sdpa, **inputs), atol=ATOL, rtol=0)
    with torch.no_grad():
        out = sdpa(**inputs, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, HEADS, 14, 14)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, HEADS, 14), atol=1e-5, rtol=0)
    weights = out.attentions[0]  # (B, H, T, T): masked keys get no weight: row 0's last 2 visual, row 1's 3 pads
    assert weights[0, :, :, 12:].max() == 0 and weights[1, :, :, 6:9].max() == 0
    assert weights[0, :, :, :12].min() > 0 and weights[1, :, :, :6].min() > 0
    assert len(out.hidden_states) == 3 and torch.equal(out.hidden_states[-1], out.last_hidden_state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention: on CPU its compile takes ~20 s")
def test_flex_attention_agrees_with_eager():
    """BART's additive mask goes to flex_attention as a (B, 1, T, T) score mask (transformers reads [b][0][q][k])."""
    state = vl_bart_state_dict(seed=41)
    eager = ours_from_original(state, attn_implementation="eager").cuda()
    flex = ours_from_original(state, attn_implementation="flex_attention").cuda()
    ids = text_batch(seed=42).cuda()
    feats, boxes = (t.cuda() for t in visual_batch(seed=43))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).cuda()
    inputs = dict(input_ids=ids, visual_feats=feats, visual_pos=boxes, visual_attention_mask=mask)
    torch.testing.assert_close(joint(flex, **inputs), joint(eager, **inputs), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ the package parts
def test_pooling_and_head_are_the_shared_retrieval_head():
    state = vl_bart_state_dict(seed=29)
    model = ours_from_original(state, pooling="mean", normalize=False)
    ids = text_batch(seed=30)
    feats, boxes = visual_batch(seed=31)
    with torch.no_grad():
        out = model(input_ids=ids, visual_feats=feats, visual_pos=boxes)
    mask = torch.cat([(ids != 1).long(), torch.ones(2, 5, dtype=torch.long)], dim=1)
    assert torch.equal(out.attention_mask, mask)
    for row in range(2):
        torch.testing.assert_close(out.pooler_output[row], out.last_hidden_state[row][mask[row].bool()].mean(0),
                                   atol=ATOL, rtol=0)


def test_save_load_and_remote_code_round_trip_without_the_package(tmp_path):
    state = vl_adapter_bart_state_dict(seed=32)
    model = ours_from_original(state, task="caption", visual_downsample_size=6, projection_dim=8)
    model.save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["backbone"] == "bart" and saved["auto_map"]["AutoModel"] == "modeling_joint_encoder.JointEncoderModel"
    ids = text_batch(seed=33)
    feats = visual_batch(seed=34, tokens=49)[0]
    with torch.no_grad():
        expected = model(input_ids=ids, visual_feats=feats).pooler_output
    reloaded = AutoModel.from_pretrained(tmp_path / "model").eval()
    assert isinstance(reloaded, JointEncoderModel) and reloaded.config.backbone == "bart"
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, visual_feats=feats).pooler_output, expected)
    torch.save({"ids": ids, "feats": feats, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path = [p for p in sys.path if p not in ("", {os.getcwd()!r})]
        sys.modules["vl_joint_encoder"] = None  # any import of the package now fails
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        with torch.no_grad():
            out = model(input_ids=io["ids"], visual_feats=io["feats"]).pooler_output
        print("MAXDIFF", float((out - io["expected"]).abs().max()))
        """
    )
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split("MAXDIFF")[1]) == 0.0


def test_gradient_checkpointing_same_gradients_and_dropout_in_train_mode_only():
    state = vl_adapter_bart_state_dict(seed=35)
    ids = text_batch(seed=36)
    feats, boxes = visual_batch(seed=37)

    def grads(checkpointing):
        model = ours_from_original(state, task="vqa").train()  # dropout 0: train mode is deterministic
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in model.encoder_blocks)
        out = model(input_ids=ids, visual_feats=feats, visual_pos=boxes).pooler_output
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 30
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    noisy = ours_from_original(state, task="vqa", dropout_rate=0.3).train()
    a = noisy(input_ids=ids, visual_feats=feats).last_hidden_state
    b = noisy(input_ids=ids, visual_feats=feats).last_hidden_state
    assert (a - b).abs().max() > 1e-4
    noisy.eval()
    assert torch.equal(joint(noisy, input_ids=ids, visual_feats=feats), joint(noisy, input_ids=ids, visual_feats=feats))


def test_fresh_bart_model_init_and_bf16_run():
    torch.manual_seed(0)
    model = JointEncoderModel(JointEncoderConfig(backbone="bart", vocab_size=VOCAB_SIZE, d_model=32, d_ff=37,
                                                 num_layers=2, num_heads=4, feat_dim=16, max_position_embeddings=64))
    assert torch.equal(model.layers[0].final_layer_norm.weight, torch.ones(32))
    assert 0.015 < float(model.layers[0].fc1.weight.detach().std()) < 0.025  # BART's N(0, 0.02)
    ids = text_batch(seed=38)
    feats, boxes = visual_batch(seed=39)
    with torch.no_grad():
        fp32 = model.eval()(input_ids=ids, visual_feats=feats, visual_pos=boxes).pooler_output
        bf16 = model.to(torch.bfloat16)(input_ids=ids, visual_feats=feats, visual_pos=boxes).pooler_output
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
    assert torch.nn.functional.cosine_similarity(bf16.float(), fp32).min() > 0.98


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(input_ids=torch.ones(1, 65, dtype=torch.long)), "BART has 64 learned positions"),
        (dict(input_ids=torch.tensor([[0, 500]])), "vocabulary has 500 entries"),
    ],
)
def test_bad_inputs_raise_clear_errors(bad, message):
    model = ours_from_original(vl_bart_state_dict(seed=40))
    with pytest.raises(ValueError, match=message):
        model(**bad)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(d_kv=16), r"d_kv \(16\) x num_heads \(4\) must equal d_model \(32\)"),
        (dict(feed_forward_proj="gated-gelu"), "no gated feed-forward"),
        (dict(relative_attention_num_buckets=32), "is a T5 field"),
        (dict(backbone="gpt"), "backbone must be one of"),
    ],
)
def test_config_validation(bad, message):
    kwargs = dict(backbone="bart", d_model=32, d_ff=37, num_layers=2, num_heads=4, feat_dim=16)
    kwargs.update(bad)
    with pytest.raises(ValueError, match=message):
        JointEncoderConfig(**kwargs)


def test_config_defaults_are_the_bart_base_shape():
    config = JointEncoderConfig(backbone="bart")
    assert (config.vocab_size, config.d_model, config.num_layers, config.num_heads, config.d_kv, config.d_ff) == (
        50465, 768, 6, 12, 64, 3072
    )
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (1, 2, 0)
    assert (config.max_position_embeddings, config.layer_norm_epsilon, config.feed_forward_proj) == (1024, 1e-5, "gelu")
    assert config.relative_attention_num_buckets is None and JointEncoderConfig().max_position_embeddings is None
