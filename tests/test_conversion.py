"""Conversion of VL-T5 / VL-Adapter / T5 checkpoints: the key map, parity with an independent reference
(tests/reference_vl_t5.py on the SOURCE state dict; transformers' T5EncoderModel for T5), the model card, and every
bad input the issue lists. Synthetic checkpoints are written here by hand in the original key layout."""

import hashlib
import os

import pytest
import torch
from conftest import randomize_, tiny_config_kwargs
from huggingface_hub import ModelCard
from reference_vl_t5 import reference_encoder

from conversion.convert_vl_t5_checkpoint import convert, main, self_check
from conversion.functional_encoder import EncoderHyperParameters
from conversion.key_map import (
    ConversionError,
    choose_adapter_task,
    detect_source,
    map_keys,
    strip_prefixes,
    unsupported_variants,
)
from vl_joint_encoder import JointEncoderConfig, JointEncoderModel
from vl_joint_encoder.utils.model_cards import render_model_card


ATOL = 1e-5
ALIASES = (
    "encoder.embed_tokens.weight",
    "encoder.visual_embedding.obj_order_embedding.weight",
    "decoder.embed_tokens.weight",
    "lm_head.weight",
)


# ------------------------------------------------------------------------------------------- synthetic checkpoints
def original_checkpoint(seed=0, tasks=(), ddp=True, legacy=False, **overrides):
    """
    A VL-T5 (tasks=()) or VL-Adapter (tasks=('vqa', ...)) state dict in the original layout, written by hand: `module.`
    prefix, `shared.weight` with its four aliases (the same tensor), decoder / lm_head / answer_head keys, encoder
    adapters per task plus decoder adapters. Returns (state, encoder_state_for_reference).
    """
    torch.manual_seed(seed)
    kwargs = tiny_config_kwargs(**overrides)
    if tasks:
        kwargs["adapter_reduction_factor"] = 4
    model = randomize_(JointEncoderModel(JointEncoderConfig(**kwargs)), seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    state = {}
    for key, value in model.state_dict().items():
        if key == "shared.weight":
            state[key] = value
        elif ".adapter." in key:
            block, param = key.split(".adapter.")
            kind = "attn_adapter" if block.endswith("layer.0") else "ff_adapter"
            for t, task in enumerate(tasks):  # the first task holds the model's adapters, others are random
                tensor = value if t == 0 else torch.randn(value.shape, generator=generator) * 0.3
                state[f"encoder.{block}.{kind}.adapters.{task}.{param}"] = tensor
        else:
            state[("vis_encoder." if legacy else "encoder.") + key] = value
    for alias in ALIASES:
        state[alias] = state["shared.weight"]
    d = kwargs["d_model"]
    state["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.randn(d, d, generator=generator)
    state["decoder.block.0.layer.1.EncDecAttention.k.weight"] = torch.randn(d, d, generator=generator)
    state["decoder.final_layer_norm.weight"] = torch.ones(d)
    state["answer_head.logit_fc.0.weight"] = torch.randn(3, d, generator=generator)
    for task in tasks:
        state[f"decoder.block.0.layer.2.ff_adapter.adapters.{task}.down_sampler.weight"] = torch.randn(8, d)
    encoder_state = {
        ("encoder." + k[len("vis_encoder.") :] if k.startswith("vis_encoder.") else k): v for k, v in state.items()
    }
    if ddp:
        state = {"module." + k: v for k, v in state.items()}
    return state, encoder_state, model.config

# what sentence-transformers reads (vl_joint_encoder.sentence_transformers_files), next to what transformers reads
SENTENCE_TRANSFORMERS_FILES = [
    "config_sentence_transformers.json", "modules.json", "sentence_transformers_joint_encoder.json",
    "sentence_transformers_joint_encoder.py", "sentence_transformers_files.py", "processing_joint_encoder.py", "images.py",
]


def inputs(config, num_visual=5, seed=7):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, config.vocab_size, (2, 8), generator=generator)
    input_ids[:, -1] = 1
    input_ids[0, -2:] = 0
    feats = torch.randn(2, num_visual, config.feat_dim, generator=generator) * 2.0
    xy1 = torch.rand(2, num_visual, 2, generator=generator) * 0.5
    boxes = torch.cat([xy1, xy1 + torch.rand(2, num_visual, 2, generator=generator) * 0.5], dim=-1)
    return dict(input_ids=input_ids, visual_feats=feats, visual_pos=boxes)


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ------------------------------------------------------------------------------------------------------ key map
def test_key_map_accounts_for_every_key():
    state, _, config = original_checkpoint(tasks=("vqa", "gqa"))
    stripped = strip_prefixes(state, "vl-adapter")
    assert not any(k.startswith("module.") for k in stripped) and len(stripped) == len(state)
    mapping = map_keys(stripped, adapter_task="gqa")
    assert mapping.kept["shared.weight"] == "shared.weight"
    assert mapping.kept["block.1.layer.0.adapter.down_sampler.weight"] == (
        "encoder.block.1.layer.0.attn_adapter.adapters.gqa.down_sampler.weight"
    )
    assert mapping.kept["block.0.layer.1.adapter.up_sampler.bias"] == (
        "encoder.block.0.layer.1.ff_adapter.adapters.gqa.up_sampler.bias"
    )
    assert (
        mapping.kept["visual_embedding.feat_embedding.1.weight"] == "encoder.visual_embedding.feat_embedding.1.weight"
    )
    assert sorted(mapping.tied) == sorted(ALIASES)
    assert "encoder.block.0.layer.0.attn_adapter.adapters.vqa.down_sampler.weight" in mapping.ignored
    assert "answer_head.logit_fc.0.weight" in mapping.ignored and "decoder.final_layer_norm.weight" in mapping.ignored
    assert not mapping.unexpected
    # every source key lands in exactly one group
    assert len(mapping.kept) + len(mapping.tied) + len(mapping.ignored) == len(stripped)
    ours = set(JointEncoderModel(config).state_dict())
    assert set(mapping.kept) == ours


def test_legacy_vis_encoder_rename_is_vl_t5_only():
    state = {
        "module.vis_encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(1),
        "module.shared.weight": torch.zeros(1),
    }
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in strip_prefixes(state, "vl-t5")
    assert "vis_encoder.block.0.layer.0.SelfAttention.q.weight" in strip_prefixes(state, "vl-adapter")
    backbone = {"vis_encoder.model.visual.layer4.0.conv1.weight": torch.zeros(1)}
    assert list(unsupported_variants(backbone)) == [
        "a CLIP backbone inside the model (vis_encoder.*, feature_type raw)"
    ]


def test_adapter_task_choice():
    state, encoder_state, _ = original_checkpoint(tasks=("vqa", "gqa", "nlvr"))
    with pytest.raises(ConversionError, match=r"choose one with --adapter-task") as error:
        choose_adapter_task(encoder_state, None)
    assert "['gqa', 'nlvr', 'vqa']" in str(error.value)
    with pytest.raises(ConversionError, match=r"unknown adapter task 'caption'.*\['gqa', 'nlvr', 'vqa'\]"):
        choose_adapter_task(encoder_state, "caption")
    assert choose_adapter_task(encoder_state, "nlvr") == "nlvr"
    single, single_encoder, _ = original_checkpoint(tasks=("vqa",))
    assert choose_adapter_task(single_encoder, None) == "vqa"
    # use_single_adapter: one module registered under every task name -> identical tensors, no choice needed
    shared = {k.replace(".vqa.", ".gqa."): v for k, v in single_encoder.items() if ".adapters.vqa." in k}
    assert choose_adapter_task({**single_encoder, **shared}, None) == "gqa"
    _, plain, _ = original_checkpoint()
    with pytest.raises(ConversionError, match="no encoder adapters"):
        choose_adapter_task(plain, "vqa")


@pytest.mark.parametrize(
    "key, variant",
    [
        ("encoder.block.0.layer.1.ff_adapter.adapter_layers_hyper_net.down.weight", "hyperformer"),
        ("encoder.block.0.layer.1.ff_adapter.adapters.vqa.down_sampler.phm_rule", "compacter"),
        ("encoder.block.0.layer.1.ff_adapter.adapters.vqa.down_sampler.W_left", "low-rank"),
        ("encoder.prompt_modules.vqa.prefix_emb", "prompt"),
        ("encoder.block.0.layer.0.SelfAttention.q.lora_A", "LoRA"),
    ],
)
def test_unsupported_variants_are_refused_by_name(tmp_path, key, variant):
    state, _, _ = original_checkpoint(tasks=("vqa",))
    state["module." + key] = torch.zeros(2, 2)
    assert detect_source(state) == "vl-adapter"
    torch.save(state, tmp_path / "LAST.pth")
    with pytest.raises(ConversionError, match=rf"unsupported checkpoint variant, refused: .*{variant}"):
        convert(tmp_path / "LAST.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("variant", ["ddp", "legacy_vis_encoder", "shared_vis_norm", "gated_no_ddp"])
def test_vl_t5_conversion_matches_the_reference(tmp_path, variant):
    overrides = {
        "shared_vis_norm": dict(individual_vis_layer_norm=False),
        "gated_no_ddp": dict(feed_forward_proj="gated-gelu"),
    }.get(variant, {})
    state, encoder_state, source_config = original_checkpoint(
        seed=1, ddp=variant != "gated_no_ddp", legacy=variant == "legacy_vis_encoder", **overrides
    )
    torch.save(state, tmp_path / "Epoch30.pth")
    result = convert(
        tmp_path / "Epoch30.pth",
        tmp_path / "out",
        projection_dim=12,
        similarity="dot",
        relative_attention_max_distance=20,
    )
    assert result.source == "vl-t5" and result.source_detected
    assert result.self_checks[0].max_abs_diff <= ATOL
    model = JointEncoderModel.from_pretrained(tmp_path / "out").eval()
    for name in (
        "vocab_size",
        "d_model",
        "d_kv",
        "d_ff",
        "num_layers",
        "num_heads",
        "relative_attention_num_buckets",
        "feat_dim",
        "n_images",
        "individual_vis_layer_norm",
        "feed_forward_proj",
    ):
        assert getattr(model.config, name) == getattr(source_config, name), name
    assert model.config.projection_dim == 12 and model.config.similarity == "dot"
    batch = inputs(model.config)
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
    expected = reference_encoder(
        encoder_state,
        num_heads=4,
        num_buckets=8,
        max_distance=20,
        gated_gelu=variant == "gated_no_ddp",
        individual_vis_layer_norm=variant != "shared_vis_norm",
        **batch,
    )
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([
        "README.md",
        "clip_resnet.py",  # remote code: the config module imports it for CLIP-ResNet towers
        "config.json",
        "configuration_joint_encoder.py",
        "model.safetensors",
        "modeling_joint_encoder.py",
        *SENTENCE_TRANSFORMERS_FILES,
    ])
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("downsample", [True, False])
def test_vl_adapter_conversion_matches_the_reference(tmp_path, downsample):
    state, encoder_state, _ = original_checkpoint(seed=2, tasks=("vqa", "gqa"), feat_dim=24)
    torch.save(state, tmp_path / "LAST.pth")
    result = convert(
        tmp_path / "LAST.pth",
        tmp_path / "out",
        adapter_task="vqa",
        downsample=None if downsample else False,
        relative_attention_max_distance=20,
    )
    assert result.source == "vl-adapter" and result.mapping.adapter_task == "vqa"
    model = JointEncoderModel.from_pretrained(tmp_path / "out").eval()
    assert model.config.adapter_reduction_factor == 4
    assert model.config.visual_downsample_size == (6 if downsample else None)
    batch = inputs(model.config, num_visual=49)  # a 7x7 CLIP grid
    batch["visual_pos"] = torch.zeros_like(batch["visual_pos"])  # VL-Adapter feeds zero boxes
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
    expected = reference_encoder(
        encoder_state,
        num_heads=4,
        num_buckets=8,
        max_distance=20,
        adapter_task="vqa",
        downsample=6 if downsample else None,
        **batch,
    )
    assert ours.shape == (2, 8 + (36 if downsample else 49), 32)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])  # T5, T5 v1.1
def test_t5_initialisation_equals_t5_encoder_on_text(tmp_path, feed_forward_proj):
    from transformers import AutoTokenizer, T5Config, T5EncoderModel, T5ForConditionalGeneration

    from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer

    texts = ["the quick brown fox jumps over the lazy dog", "a photo of the eiffel tower in paris at night"] * 20
    base = train_vl_t5_tokenizer(texts, vocab_size=60, n_vis=0)  # a T5 tokenizer: pieces + 100 <extra_id_*>
    base.save_pretrained(tmp_path / "t5-tokenizer")
    num_tokens = len(base)
    rows = (num_tokens // 64 + 1) * 64  # T5 pads its embedding beyond the tokenizer (32128 rows for 32100 tokens)
    t5_config = T5Config(
        vocab_size=rows,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        dropout_rate=0.0,
        feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=feed_forward_proj == "relu",  # T5 v1.1 unties lm_head
    )
    torch.manual_seed(3)
    t5 = randomize_(T5ForConditionalGeneration(t5_config), seed=3)
    t5.save_pretrained(tmp_path / "t5")
    result = convert(tmp_path / "t5", tmp_path / "out", tokenizer=str(tmp_path / "t5-tokenizer"), feat_dim=20)
    assert result.source == "t5" and [c.max_abs_diff <= ATOL for c in result.self_checks] == [True, True, True]

    model = JointEncoderModel.from_pretrained(tmp_path / "out").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == len(tokenizer) == num_tokens + 100
    assert [tokenizer.convert_tokens_to_ids(f"<vis_extra_id_{k}>") for k in (0, 99)] == [num_tokens + 99, num_tokens]
    assert model.config.feat_dim == 20 and model.config.feed_forward_proj == feed_forward_proj
    reference = T5EncoderModel.from_pretrained(tmp_path / "t5").eval()
    batch = tokenizer(
        ["a photo of the lazy fox", "the eiffel tower at night in paris"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
        expected = reference(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], expected[mask], atol=ATOL, rtol=0)
    embedding = model.shared.weight.detach()
    torch.testing.assert_close(embedding[:num_tokens], t5.shared.weight.detach()[:num_tokens], atol=0, rtol=0)
    new = embedding[num_tokens:]  # the <vis_extra_id_*> rows: finite, distinct, of the scale of real rows
    assert torch.isfinite(new).all() and torch.cdist(new, new).add(torch.eye(100) * 1e9).min() > 1e-3
    assert 0.5 < new.std() / embedding[:num_tokens].std() < 2.0
    with torch.no_grad():  # and the visual path runs
        joint = model(**batch, **{k: v for k, v in inputs(model.config).items() if k != "input_ids"})
    assert joint.last_hidden_state.shape[1] == batch["input_ids"].shape[1] + 5


# ----------------------------------------------------------------------------------------- self-check, card
def test_self_check_fails_above_tolerance_and_leaves_nothing(tmp_path):
    state, encoder_state, _ = original_checkpoint(seed=4)
    torch.save(state, tmp_path / "Epoch30.pth")
    convert(tmp_path / "Epoch30.pth", tmp_path / "good")
    hp = EncoderHyperParameters(num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=128)
    wrong = dict(encoder_state)  # a 1% error in one matrix must be caught
    wrong["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = (
        wrong["encoder.block.1.layer.1.DenseReluDense.wo.weight"] * 1.01
    )
    with pytest.raises(ConversionError, match=r"self-check failed \(float64, text \+ visual tokens\).* > 1e-05"):
        self_check(tmp_path / "good", wrong, hp)
    with pytest.raises(ConversionError, match="self-check failed"):
        convert(tmp_path / "Epoch30.pth", tmp_path / "out", tolerance=-1.0)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_model_card_states_the_facts(tmp_path):
    state, _, _ = original_checkpoint(seed=5, tasks=("vqa",))
    torch.save(state, tmp_path / "BEST.pth")
    result = convert(tmp_path / "BEST.pth", tmp_path / "out", push_to_hub_repo=None)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    text = card.content
    assert hashlib.sha256((tmp_path / "BEST.pth").read_bytes()).hexdigest() in text
    assert "`BEST.pth`" in text and "`vl-adapter`" in text and "adapter task kept | `vqa`" in text
    assert f"**kept** ({len(result.mapping.kept)} tensors)" in text and "**tied** (4 aliases" in text
    assert f"**{result.self_checks[0].max_abs_diff:.3g}**" in text
    assert 'AutoModel.from_pretrained("out", trust_remote_code=True)' in text
    for citation in ("cho2021vlt5", "sung2022vladapter", "raffel2020t5"):
        assert citation in text
    assert card.data.library_name == "transformers" and "vl-t5" in card.data.tags
    with pytest.raises(ValueError, match=r"needs values for \[.*'config'.*'source_sha256'"):
        render_model_card("converted_model_card", model_name="x")


# ------------------------------------------------------------------------------------------------- bad inputs
class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_checkpoints(tmp_path):
    good, _, _ = original_checkpoint(seed=6, tasks=("vqa", "gqa"))
    torch.save(good, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    torch.save({"epoch": 3, "lr": torch.tensor(0.1)}, tmp_path / "not_state.pth")
    torch.save({"weights": RunsCodeWhenUnpickled(str(tmp_path / "EXECUTED"))}, tmp_path / "code.pth")
    bart = {
        "module.model.shared.weight": torch.zeros(4, 2),
        "module.model.encoder.layers.0.fc1.weight": torch.zeros(2, 2),
        "module.model.encoder.visual_embedding.feat_embedding.0.weight": torch.zeros(2, 2),
    }
    torch.save(bart, tmp_path / "vl_bart.pth")
    missing = {k: v for k, v in good.items() if "block.1.layer.0.SelfAttention.k" not in k}
    torch.save(missing, tmp_path / "missing.pth")
    shapes = dict(good)
    shapes["module.encoder.block.1.layer.1.DenseReluDense.wo.weight"] = torch.zeros(32, 40)
    torch.save(shapes, tmp_path / "shapes.pth")
    extra = dict(good)
    extra["module.encoder.block.0.layer.0.SelfAttention.extra.weight"] = torch.zeros(2)
    torch.save(extra, tmp_path / "extra.pth")


@pytest.mark.parametrize(
    "file, options, message",
    [
        ("absent.pth", {}, r"does not exist"),
        ("truncated.pth", {}, r"cannot read truncated.pth \(truncated or corrupt\?\)"),
        ("list.pth", {}, r"holds a list, not a state dict"),
        ("not_state.pth", {}, r"not a state dict: 1 entries are not tensors \(e.g. \['epoch'\]\)"),
        ("code.pth", {}, r"needs arbitrary code to unpickle.*refused"),
        ("vl_bart.pth", {"source": "vl-t5"}, r"looks like a VL-BART checkpoint"),
        ("missing.pth", {"adapter_task": "vqa"}, r"missing 1 key\(s\) \(ours\): \['block.1.layer.0.SelfAttention.k"),
        (
            "shapes.pth",
            {"adapter_task": "vqa"},
            r"shape mismatch .*DenseReluDense.wo.weight: \(32, 40\) in the checkpoint, \(32, 37\) expected",
        ),
        (
            "extra.pth",
            {"adapter_task": "vqa"},
            r"unexpected 1 key\(s\) \(not in the ignore list\): \['encoder.block.0.layer.0.SelfAttention.extra",
        ),
        ("good.pth", {"adapter_task": "caption"}, r"unknown adapter task 'caption'"),
        ("good.pth", {"source": "t5"}, r"needs a transformers T5 directory"),
    ],
)
def test_bad_inputs_are_refused_clearly(tmp_path, file, options, message):
    _bad_checkpoints(tmp_path)
    with pytest.raises(ConversionError, match=message):
        convert(tmp_path / file, tmp_path / "out", **options)
    assert not (tmp_path / "EXECUTED").exists()  # the pickle's code never ran
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_existing_output_directory_needs_overwrite_and_cli_reports(tmp_path, capsys):
    state, _, _ = original_checkpoint(seed=8)
    torch.save(state, tmp_path / "Epoch30.pth")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    argv = ["--checkpoint", str(tmp_path / "Epoch30.pth"), "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 1
    assert "exists and is not empty: choose another directory or pass --overwrite" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["notes.txt"] and not leftovers(tmp_path)
    assert main(argv + ["--overwrite"]) == 0
    out = capsys.readouterr()
    assert "source: vl-t5 (detected from the keys)" in out.out and "keys: kept 26, ignored 4, tied 4" in out.out
    assert "self-check (float64, text + visual tokens): max abs diff" in out.out
    assert "no --tokenizer given" in out.err
    assert "notes.txt" not in os.listdir(tmp_path / "out") and not leftovers(tmp_path)


def test_tokenizer_that_does_not_fit_the_embedding_is_refused(tmp_path):
    from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer

    base = train_vl_t5_tokenizer(["a photo of a bridge over a river"] * 10, vocab_size=40, n_vis=0)
    base.save_pretrained(tmp_path / "t5-tokenizer")
    state, _, _ = original_checkpoint(seed=9)  # vocabulary of 99 rows
    torch.save(state, tmp_path / "Epoch30.pth")
    with pytest.raises(
        ConversionError, match=rf"has {len(base) + 100} tokens but the checkpoint's embedding has 99 rows"
    ):
        convert(tmp_path / "Epoch30.pth", tmp_path / "out", tokenizer=str(tmp_path / "t5-tokenizer"))
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
