"""Conversion of VL-BART / VL-Adapter-BART / BART checkpoints: files in the ORIGINAL layout (tests/vl_bart_fixtures.py,
saved with torch.save as the original trainers do), converted and compared with the independent functional VL-BART
encoder (tests/reference_vl_bart.py) and, for `--source bart`, with transformers' BartModel encoder; the key
accounting, norm layouts, tokenizer layout, text prefixes, model card, the Hub push, and every bad input."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import hub_server  # noqa: F401  (pytest fixture)
from huggingface_hub import ModelCard
from reference_vl_bart import reference_vl_bart_encoder, strip_ddp_prefix
from test_conversion import SENTENCE_TRANSFORMERS_FILES, original_checkpoint
from vl_bart_fixtures import (
    BASE_VOCAB_SIZE,
    SHARED_ALIASES,
    TINY,
    VL_ADAPTER_TASKS,
    VOCAB_SIZE,
    bart_config_kwargs,
    build_tiny_bart_tokenizer,
    encoder_keys,
    save_checkpoint,
    vl_adapter_bart_state_dict,
    vl_bart_state_dict,
)

from conversion.convert_vl_t5_checkpoint import convert, main
from conversion.key_map import ConversionError, detect_source, map_bart_keys, strip_prefixes
from vl_joint_encoder import JointEncoderModel, JointEncoderProcessor


ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-5
HEADS = TINY["num_heads"]


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def batch(num_visual=5, seed=7, two_images=False):
    """<s> ... </s> + padding (pad 1), features and boxes; with two_images, NLVR2's order ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, BASE_VOCAB_SIZE, (2, 8), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    ids[0, -3:] = torch.tensor([2, 1, 1])
    feats = torch.randn(2, num_visual, TINY["feat_dim"], generator=g) * 2.0
    xy1 = torch.rand(2, num_visual, 2, generator=g) * 0.5
    out = dict(input_ids=ids, visual_feats=feats,
               visual_pos=torch.cat([xy1, xy1 + torch.rand(2, num_visual, 2, generator=g) * 0.5], dim=-1))
    if two_images:
        half = num_visual // 2
        out["image_order_ids"] = torch.tensor([[0] * half + [1] * half] * 2)
        out["object_order_ids"] = torch.tensor([list(range(half)) * 2] * 2)
    return out


def ours(folder, inputs):
    model = JointEncoderModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model, model(**inputs).last_hidden_state


# --------------------------------------------------------------------------------------------------- key map
def test_key_map_accounts_for_every_key_of_a_vl_adapter_bart_file():
    state = strip_prefixes(vl_adapter_bart_state_dict(answer_head=True), "vl-adapter-bart")
    mapping = map_bart_keys(state, adapter_task="nlvr", visual_norm_layout="per-projection")
    assert len(mapping.kept) + len(mapping.tied) + len(mapping.ignored) == len(state) and not mapping.unexpected
    assert sorted(mapping.tied) == sorted(SHARED_ALIASES)
    assert mapping.kept["shared.weight"] == "model.shared.weight"
    assert mapping.kept["layers.1.ff_adapter.up_sampler.bias"] == (
        "model.encoder.layers.1.ff_adapter.adapters.nlvr.up_sampler.bias"
    )
    assert mapping.kept["embed_positions.weight"] == "model.encoder.embed_positions.weight"
    assert {"final_logits_bias", "answer_head.0.weight", "model.decoder.layernorm_embedding.weight",
            "model.encoder.layers.0.attn_adapter.adapters.vqa.down_sampler.weight"} <= set(mapping.ignored)
    # the spec's count: 16 per layer + 32 adapter tensors per layer (2 controllers x 4 tasks x 4), 10 visual names
    # (with the obj alias), embed_positions, layernorm_embedding (2), shared + embed_tokens
    assert len(encoder_keys(vl_adapter_bart_state_dict())) == 2 * (16 + 8 * len(VL_ADAPTER_TASKS)) + 10 + 1 + 2 + 2
    # kept: ours, one task's adapters (2 controllers x 4 tensors per layer), no aliases
    assert len(mapping.kept) == 2 * (16 + 8) + 9 + 1 + 2 + 1  # + shared.weight
    assert detect_source(vl_adapter_bart_state_dict()) == "vl-adapter-bart"
    assert detect_source(vl_bart_state_dict()) == "vl-bart"


# ---------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("variant", ["released", "legacy_vis_encoder_no_ddp", "no_vis_norm", "share_vis_lang"])
def test_vl_bart_conversion_matches_the_reference(tmp_path, variant):
    state = vl_bart_state_dict(seed=1, answer_head=True, ddp=variant != "legacy_vis_encoder_no_ddp",
                               use_vis_layer_norm=variant != "no_vis_norm")
    reference_state = dict(state)
    if variant == "legacy_vis_encoder_no_ddp":  # an old VL-T5 code version saved the encoder as model.vis_encoder
        state = {k.replace("model.encoder.", "model.vis_encoder."): v for k, v in state.items()}
    path = save_checkpoint(state, tmp_path / "snap" / "Epoch30.pth")
    share = variant == "share_vis_lang"
    result = convert(path, tmp_path / "out", num_heads=HEADS, task="vqa", share_vis_lang_layer_norm=share)
    assert result.source == "vl-bart" and result.source_detected
    assert [c.max_abs_diff <= c.tolerance for c in result.self_checks] == [True, True]
    assert result.self_checks[0].max_abs_diff < 1e-12  # float64: conversion errors only, no rounding
    inputs = batch()
    model, hidden = ours(tmp_path / "out", inputs)
    config = model.config
    assert (config.backbone, config.vocab_size, config.d_model, config.num_layers, config.num_heads, config.d_ff) == (
        "bart", VOCAB_SIZE, TINY["d_model"], TINY["encoder_layers"], HEADS, TINY["ffn_dim"]
    )
    assert config.max_position_embeddings == TINY["max_position_embeddings"] and config.feat_dim == TINY["feat_dim"]
    assert config.use_vis_layer_norm == (variant != "no_vis_norm")
    assert config.individual_vis_layer_norm is (variant == "no_vis_norm")  # read off the keys (moot without norms)
    assert config.text_prefix == "vqa: " and config.share_vis_lang_layer_norm == share
    expected = reference_vl_bart_encoder(reference_state, num_heads=HEADS, individual_vis_layer_norm=False,
                                         use_vis_layer_norm=variant != "no_vis_norm",
                                         share_vis_lang_layer_norm=share, **inputs)
    torch.testing.assert_close(hidden, expected, atol=ATOL, rtol=0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([
        "README.md", "clip_resnet.py", "config.json", "configuration_joint_encoder.py", "model.safetensors",
        "modeling_joint_encoder.py", *SENTENCE_TRANSFORMERS_FILES,
    ])
    assert not leftovers(tmp_path / "snap")


@pytest.mark.parametrize("single", [False, True], ids=["multiple_adapters.sh", "single_adapter.sh"])
def test_vl_adapter_bart_conversion_matches_the_reference_with_downsampling(tmp_path, single):
    state = vl_adapter_bart_state_dict(seed=2, use_single_adapter=single)
    path = save_checkpoint(state, tmp_path / "LAST.pth")
    result = convert(path, tmp_path / "out", adapter_task="gqa", num_heads=HEADS)
    assert result.source == "vl-adapter-bart" and result.mapping.adapter_task == "gqa"
    model, hidden = ours(tmp_path / "out", one := batch(num_visual=49))
    assert model.config.adapter_reduction_factor == 8 and model.config.visual_downsample_size == 6
    assert model.config.individual_vis_layer_norm is True  # VL-Adapter's scripts keep the per-projection norms
    # multitask.py prompts only with --use_tasks_prompts (single_adapter.sh): "gpa: " (sic) for GQA, else none
    assert model.config.text_prefix == ("gpa: " if single else "")
    kwargs = dict(num_heads=HEADS, individual_vis_layer_norm=True, downsample=6, adapter_task="gqa")
    torch.testing.assert_close(hidden, reference_vl_bart_encoder(state, **kwargs, **one), atol=ATOL, rtol=0)
    with torch.no_grad():  # NLVR2's two grids, each pooled on its own (98 -> 72 tokens)
        two = batch(num_visual=98, two_images=True)
        hidden = model(**two).last_hidden_state
    assert hidden.shape[1] == 8 + 72
    torch.testing.assert_close(hidden, reference_vl_bart_encoder(state, **kwargs, **two), atol=ATOL, rtol=0)


def test_both_norm_layouts_need_an_explicit_choice(tmp_path):
    state = vl_bart_state_dict(seed=3)  # after-sum; add stale per-projection norms as an older code version would
    extra = vl_bart_state_dict(seed=4, individual_vis_layer_norm=True)
    for key in ("feat_embedding.1.weight", "feat_embedding.1.bias", "absolute_vis_pos_embedding.1.weight",
                "absolute_vis_pos_embedding.1.bias"):
        name = "module.model.encoder.visual_embedding." + key
        state[name] = extra[name]
    path = save_checkpoint(state, tmp_path / "Epoch30.pth")
    with pytest.raises(ConversionError, match="holds both visual norm layouts.*--visual-norm-layout per-projection"):
        convert(path, tmp_path / "out", num_heads=HEADS)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    for layout in ("after-sum", "per-projection"):
        result = convert(path, tmp_path / layout, num_heads=HEADS, visual_norm_layout=layout)
        unused = ("_embedding.1.",) if layout == "after-sum" else ("visual_embedding.layer_norm.",)
        assert sum(any(u in k for u in unused) for k in result.mapping.ignored) == (4 if layout == "after-sum" else 2)
        _, hidden = ours(tmp_path / layout, inputs := batch())
        expected = reference_vl_bart_encoder(state, num_heads=HEADS, individual_vis_layer_norm=layout != "after-sum",
                                             **inputs)
        torch.testing.assert_close(hidden, expected, atol=ATOL, rtol=0)


def test_tokenizer_layout_is_created_or_checked_and_saved_with_the_processor(tmp_path):
    build_tiny_bart_tokenizer(with_extra_tokens=False).save_pretrained(tmp_path / "bart-base")  # a bart-base folder
    build_tiny_bart_tokenizer().save_pretrained(tmp_path / "vl-bart")  # already has the 200 tokens
    path = save_checkpoint(vl_bart_state_dict(seed=5), tmp_path / "Epoch30.pth")
    for name in ("bart-base", "vl-bart"):
        convert(path, tmp_path / f"out-{name}", num_heads=HEADS, tokenizer=str(tmp_path / name), task="nlvr")
        processor = JointEncoderProcessor.from_pretrained(tmp_path / f"out-{name}")
        tokenizer = processor.tokenizer
        assert len(tokenizer) == VOCAB_SIZE and processor.text_prefix == "nlvr: " and processor.feat_dim == 16
        assert [tokenizer.convert_tokens_to_ids(t) for t in ("<extra_id_99>", "<extra_id_0>", "<vis_extra_id_99>",
                                                             "<vis_extra_id_0>")] == [300, 399, 400, 499]
        encoded = processor(text=["the left image has a <pad> dog"], return_tensors="pt")
        reference = tokenizer.encode("nlvr: the left image has a <pad> dog")  # nlvr_data.py:156
        assert encoded["input_ids"][0].tolist() == reference and reference[0] == 0 and reference[-1] == 2
        assert encoded["attention_mask"][0].tolist() == [int(t != 1) for t in reference]
    wrong = vl_bart_state_dict(seed=6, vocab_size=VOCAB_SIZE + 1)
    path = save_checkpoint(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ConversionError, match=rf"has {VOCAB_SIZE} tokens but the checkpoint's embedding has 501 rows"):
        convert(path, tmp_path / "out-wrong", num_heads=HEADS, tokenizer=str(tmp_path / "bart-base"))
    assert not (tmp_path / "out-wrong").exists() and not leftovers(tmp_path)


def test_bart_initialisation_equals_bart_encoder_on_text(tmp_path):
    from transformers import BartConfig, BartForConditionalGeneration, BartModel

    build_tiny_bart_tokenizer(with_extra_tokens=False).save_pretrained(tmp_path / "tokenizer")
    config = BartConfig(**bart_config_kwargs(vocab_size=BASE_VOCAB_SIZE))
    torch.manual_seed(8)
    bart = BartForConditionalGeneration(config).eval()
    with torch.no_grad():  # typical magnitudes everywhere, so that no path is an identity
        for param in bart.parameters():
            param.add_(torch.randn_like(param) * (0.3 if param.dim() == 1 else 0.05))
    bart.save_pretrained(tmp_path / "bart")
    result = convert(tmp_path / "bart", tmp_path / "out", tokenizer=str(tmp_path / "tokenizer"), feat_dim=20)
    assert result.source == "bart" and result.source_detected and len(result.self_checks) == 3
    assert all(c.max_abs_diff <= c.tolerance for c in result.self_checks)
    assert max(c.max_abs_diff for c in result.self_checks[:2]) < 1e-12  # the two float64 checks
    model = JointEncoderModel.from_pretrained(tmp_path / "out").eval()
    processor = JointEncoderProcessor.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == len(processor.tokenizer) == BASE_VOCAB_SIZE + 200
    assert model.config.individual_vis_layer_norm is False and model.config.feat_dim == 20
    encoded = processor(text=["a photo of a cat", "what color is the car parked near the house?"], return_tensors="pt")
    reference = BartModel.from_pretrained(tmp_path / "bart").eval()
    with torch.no_grad():
        got = model(**encoded).last_hidden_state
        expected = reference.encoder(**encoded).last_hidden_state
    mask = encoded["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=ATOL, rtol=0)
    table = model.shared.weight.detach()
    torch.testing.assert_close(table[:BASE_VOCAB_SIZE], bart.model.shared.weight.detach(), atol=0, rtol=0)
    new = table[BASE_VOCAB_SIZE:]
    assert torch.isfinite(new).all() and torch.cdist(new, new).add(torch.eye(200) * 1e9).min() > 1e-3


# ---------------------------------------------------------------------------------------------------- card, CLI
def test_model_card_and_cli_report(tmp_path, capsys):
    path = save_checkpoint(vl_adapter_bart_state_dict(seed=9, use_single_adapter=True), tmp_path / "BEST.pth")
    argv = ["--checkpoint", str(path), "--output-dir", str(tmp_path / "out"), "--adapter-task", "vqa",
            "--num-heads", str(HEADS)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "source: vl-adapter-bart (detected from the keys)" in out and "adapter task: vqa" in out
    assert "config: bart, vocab 500, d_model 32, layers 2, heads 4x8" in out and "text prefix: 'vqa: '" in out
    card = ModelCard.load(tmp_path / "out" / "README.md")
    text = card.content
    assert "VL-Adapter (Sung et al., 2022) on VL-BART" in text and "BART encoder layers" in text
    assert '| text prefix of the source task | `"vqa: "`' in text and "visual LayerNorms per projection" in text
    assert "`vl-adapter-bart`" in text and "adapter task kept | `vqa`" in text
    for citation in ("cho2021vlt5", "sung2022vladapter", "lewis2020bart"):
        assert citation in text
    assert "raffel2020t5" not in text and "vl-bart" in card.data.tags
    assert "[0, 13, 27, 5, 2]" in text and "build_vl_bart_tokenizer" in text


# ------------------------------------------------------------------------------------------------- bad inputs
def _bad_files(tmp_path):
    vl_t5, _, _ = original_checkpoint(seed=10)
    torch.save(vl_t5, tmp_path / "vl_t5.pth")
    good = vl_adapter_bart_state_dict(seed=11)
    save_checkpoint(good, tmp_path / "good.pth")
    save_checkpoint(vl_bart_state_dict(seed=12), tmp_path / "vl_bart.pth")
    missing = {k: v for k, v in good.items() if "layers.1.self_attn.k_proj" not in k}
    save_checkpoint(missing, tmp_path / "missing.pth")
    shapes = dict(good)
    shapes["module.model.encoder.layers.1.fc2.weight"] = torch.zeros(32, 40)
    save_checkpoint(shapes, tmp_path / "shapes.pth")
    extra = dict(good)
    extra["module.model.encoder.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_checkpoint(extra, tmp_path / "extra.pth")
    norms = vl_adapter_bart_state_dict(seed=13, adapter_layer_norm_before=True)
    save_checkpoint(norms, tmp_path / "adapter_norms.pth")
    edited = dict(vl_bart_state_dict(seed=14))
    edited["module.model.encoder.embed_tokens.weight"] = edited["module.model.shared.weight"] + 1
    save_checkpoint(edited, tmp_path / "edited.pth")


@pytest.mark.parametrize(
    "file, options, message",
    [
        ("vl_t5.pth", {"source": "vl-bart"}, r"looks like a VL-T5 checkpoint .* --source vl-t5"),
        ("vl_t5.pth", {"source": "vl-adapter-bart"}, r"looks like a VL-T5 checkpoint"),
        ("vl_bart.pth", {"source": "vl-t5"}, r"looks like a VL-BART checkpoint .* --source vl-bart"),
        ("good.pth", {"source": "vl-adapter"}, r"looks like a VL-BART checkpoint"),
        ("good.pth", {"source": "vl-bart"}, r"holds VL-Adapter adapters .* --source vl-adapter-bart"),
        ("good.pth", {"adapter_task": "vqa"}, r"d_model 32 is not bart-base's .* --num-heads"),
        ("good.pth", {"num_heads": HEADS}, r"separate adapters for tasks \['caption', 'gqa', 'nlvr', 'vqa'\]"),
        ("good.pth", {"num_heads": HEADS, "adapter_task": "okvqa"}, r"unknown adapter task 'okvqa'"),
        ("good.pth", {"num_heads": 5, "adapter_task": "vqa"}, r"--num-heads 5 does not divide d_model 32"),
        ("vl_bart.pth", {"num_heads": HEADS, "task": "okvqa"}, r"no known text prefix for task 'okvqa'"),
        ("missing.pth", {"num_heads": HEADS, "adapter_task": "vqa"},
         r"missing 2 key\(s\) \(ours\): \['layers.1.self_attn.k_proj.bias', 'layers.1.self_attn.k_proj.weight'\]"),
        ("shapes.pth", {"num_heads": HEADS, "adapter_task": "vqa"},
         r"shape mismatch .*layers.1.fc2.weight: \(32, 40\) in the checkpoint, \(32, 37\) expected"),
        ("extra.pth", {"num_heads": HEADS, "adapter_task": "vqa"},
         r"unexpected 1 key\(s\) \(not in the ignore list\): \['model.encoder.layers.0.self_attn.extra.weight'\]"),
        ("adapter_norms.pth", {"num_heads": HEADS, "adapter_task": "vqa"},
         r"unsupported checkpoint variant, refused: adapter layer norms"),
        ("edited.pth", {"num_heads": HEADS}, r"model.encoder.embed_tokens.weight differs from model.shared.weight"),
        ("vl_bart.pth", {"num_heads": HEADS, "downsample": True}, r"--downsample only applies to VL-Adapter"),
        ("vl_t5.pth", {"num_heads": 4}, r"--num-heads .* apply to VL-BART sources"),
        ("vl_bart.pth", {"num_heads": HEADS, "visual_norm_layout": "per-projection"}, r"has no such norm"),
    ],
)
def test_bad_inputs_are_refused_clearly_and_nothing_is_written(tmp_path, file, options, message):
    _bad_files(tmp_path)
    with pytest.raises(ConversionError, match=message):
        convert(tmp_path / file, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_bad_bart_folders(tmp_path):
    from transformers import BartConfig, BartModel

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="without a readable config.json"):
        convert(tmp_path / "empty", tmp_path / "out")
    BartModel(BartConfig(**bart_config_kwargs(vocab_size=BASE_VOCAB_SIZE, pad_token_id=0, bos_token_id=1))).save_pretrained(
        tmp_path / "ids")
    with pytest.raises(ConversionError, match=r"bos, pad, eos = \(1, 0, 2\)"):
        convert(tmp_path / "ids", tmp_path / "out")
    BartModel(BartConfig(**bart_config_kwargs(vocab_size=BASE_VOCAB_SIZE))).save_pretrained(tmp_path / "bart")
    with pytest.raises(ConversionError, match="--source bart reads heads"):
        convert(tmp_path / "bart", tmp_path / "out", num_heads=4)
    from transformers import T5Config, T5EncoderModel

    T5EncoderModel(T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=4)).save_pretrained(
        tmp_path / "t5")
    with pytest.raises(ConversionError, match="holds a 't5' model, not BART"):
        convert(tmp_path / "t5", tmp_path / "out", source="bart")
    with pytest.raises(ConversionError, match="holds a 'bart' model, not T5"):
        convert(tmp_path / "bart", tmp_path / "out", source="t5")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------- Hub
@pytest.mark.slow  # two fresh Python processes (convert + push, then pull): ~30 s on 2 shared cores
def test_cli_pushes_a_vl_bart_encoder_to_the_hub_and_it_loads_back(tmp_path, hub_server):  # noqa: F811
    build_tiny_bart_tokenizer(with_extra_tokens=False).save_pretrained(tmp_path / "bart-base")
    state = vl_adapter_bart_state_dict(seed=15)
    path = save_checkpoint(state, tmp_path / "LAST.pth")
    repo_id = "vl-joint-encoder-tests/tiny-vladapter-bart"
    env = hub_server.env(tmp_path / "hf_home")
    command = [
        sys.executable, str(ROOT / "conversion" / "convert_vl_t5_checkpoint.py"), "--checkpoint", str(path),
        "--output-dir", str(tmp_path / "out"), "--source", "vl-adapter-bart", "--adapter-task", "caption",
        "--num-heads", str(HEADS), "--tokenizer", str(tmp_path / "bart-base"), "--push-to-hub", repo_id,
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"pushed: {hub_server.url}/{repo_id}" in run.stdout
    repo = hub_server.repos[repo_id]
    local = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert sorted(repo.files) == local and len(repo.commits) == 1
    assert {"processor_config.json", "processing_joint_encoder.py", "tokenizer.json"} <= set(local)
    inputs = batch(num_visual=49)
    torch.save(inputs, tmp_path / "batch.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path = [p for p in sys.path if p not in ("", {str(ROOT)!r})]
        sys.modules["vl_joint_encoder"] = None  # any import of the package now fails
        import torch
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({repo_id!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({repo_id!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            hidden = model(**torch.load({str(tmp_path / "batch.pt")!r}, weights_only=True)).last_hidden_state
        torch.save(hidden, {str(tmp_path / "hidden.pt")!r})
        print("PREFIX", repr(processor.text_prefix), "IDS", processor(text=["a cat"])["input_ids"][0].tolist())
        """
    )
    pull = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)  # fmt: skip
    assert pull.returncode == 0, pull.stderr[-3000:]
    tokenizer = build_tiny_bart_tokenizer()
    assert f"PREFIX '' IDS {tokenizer.encode('a cat')}" in pull.stdout  # multiple_adapters.sh: no prompt
    expected = reference_vl_bart_encoder(strip_ddp_prefix(state), num_heads=HEADS, individual_vis_layer_norm=True,
                                         downsample=6, adapter_task="caption", **inputs)
    torch.testing.assert_close(torch.load(tmp_path / "hidden.pt", weights_only=True), expected, atol=ATOL, rtol=0)
    assert json.loads(repo.files["config.json"])["backbone"] == "bart"
