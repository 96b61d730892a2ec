"""`vl-joint-encoder build`: from Hub ids (a local Hub serving t5-base's and CLIP ViT-B/32's architectures), from
VL-T5 checkpoints, with CLIP, SigLIP or no tower. The built folder is compared with transformers' own models
(`T5EncoderModel`, `CLIPVisionModel`, `SiglipVisionModel`, their image processors) and with the independent VL-T5
reference; its model card's snippet runs where the package is not installed."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_models import CLIP_B32, T5_BASE
from PIL import Image
from reference_vl_t5 import reference_encoder
from skimage import data as photos
from test_conversion import original_checkpoint

from vl_joint_encoder.cli import main
from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer


def card_snippet(folder: Path) -> str:
    return (folder / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]


def run_snippet(snippet: str, cwd: Path) -> str:
    """The card's snippet, as written, in a process where vl_joint_encoder cannot be imported."""
    script = "import sys\nsys.modules['vl_joint_encoder'] = None\n" + snippet
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow  # a subprocess building a 768-d encoder from the local Hub: ~20 s
def test_build_from_hub_ids_equals_transformers_models(tmp_path, model_hub):
    from transformers import (
        AutoModel,
        AutoProcessor,
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionModel,
        T5EncoderModel,
    )

    command = [str(Path(sys.executable).parent / "vl-joint-encoder"), "build", "--text", T5_BASE, "--vision", CLIP_B32,
               "--output-dir", "t5-clip", "--push-to-hub", "user/t5-clip"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env=model_hub.env(tmp_path / "hf_home"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "saved: t5-clip" in result.stdout and "pushed:" in result.stdout
    out = tmp_path / "t5-clip"
    model = AutoModel.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    config = model.config
    assert (config.d_model, config.d_ff, config.num_heads, config.d_kv, config.feat_dim) == (768, 3072, 12, 64, 768)
    assert (config.pooling, config.similarity, config.vision_config.patch_size) == ("mean", "cosine", 32)

    # the text side is t5-base's encoder: text-only outputs equal transformers' T5EncoderModel on the served weights
    t5 = T5EncoderModel.from_pretrained(model_hub.folders[T5_BASE]).eval()
    served_tokenizer = AutoTokenizer.from_pretrained(model_hub.folders[T5_BASE])
    question = "who founded this place"
    ids = served_tokenizer([question], return_tensors="pt")
    assert processor.tokenizer([question], return_tensors="pt")["input_ids"].tolist() == ids["input_ids"].tolist()
    assert processor.tokenizer.convert_tokens_to_ids("<vis_extra_id_0>") == config.vocab_size - 1
    with torch.no_grad():
        expected = t5(**ids).last_hidden_state
        ours = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)

    # the vision side is CLIP ViT-B/32: the repo's own preprocessing, and the tower's own patch tokens
    photo = Image.fromarray(photos.astronaut())
    reference_processor = CLIPImageProcessorPil.from_pretrained(model_hub.folders[CLIP_B32])
    pixels = reference_processor(images=[photo], return_tensors="pt")["pixel_values"]  # (1, 3, 224, 224)
    batch = processor(text=[question], images=[photo], return_tensors="pt")
    torch.testing.assert_close(batch["pixel_values"].flatten(0, 1), pixels, atol=0, rtol=0)
    tower = CLIPVisionModel.from_pretrained(model_hub.folders[CLIP_B32]).eval()
    with torch.no_grad():
        patches = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]  # (1, 49, 768)
        tokens = model.get_image_features(batch["pixel_values"])["visual_feats"]
        embedding = model.encode(**batch)
    torch.testing.assert_close(tokens, patches, atol=1e-6, rtol=0)
    assert embedding.shape == (1, 768) and torch.isfinite(embedding).all()
    assert not any(p.requires_grad for p in model.vision_model.parameters())

    card = (out / "README.md").read_text()
    assert card.split("---\n", 2)[2].lstrip().startswith("# t5-clip\n")
    assert f"`{T5_BASE}`" in card and f"`{CLIP_B32}`" in card and "Not trained for retrieval yet" in card
    assert "user/t5-clip" in model_hub.repos and "model.safetensors" in model_hub.repos["user/t5-clip"].files
    assert 'from_pretrained("user/t5-clip"' in card_snippet(out)  # pushed: the snippet names the repo (the snippet
    # itself runs in the other build tests and in test_demo)


@pytest.fixture(scope="module")
def local_sources(tmp_path_factory):
    """A tiny VL-T5 checkpoint with its T5 tokenizer, a tiny T5 folder, tiny CLIP and SigLIP folders."""
    from transformers import CLIPVisionModel, SiglipVisionModel, T5Config, T5ForConditionalGeneration

    from vl_joint_encoder.processing_joint_encoder import default_image_processor
    from vl_joint_encoder.vision import tiny_clip_vision_config, tiny_siglip_vision_config

    root = tmp_path_factory.mktemp("sources")
    texts = ["who designed this bridge", "a photo of the golden gate bridge at dusk", "which river flows here"] * 10
    tokenizer = train_vl_t5_tokenizer(texts, vocab_size=60, n_vis=0)
    tokenizer.save_pretrained(root / "t5-tokenizer")
    state, encoder_state, _ = original_checkpoint(seed=11, vocab_size=len(tokenizer) + 100)
    torch.save(state, root / "Epoch30.pth")
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                        num_heads=4, relative_attention_num_buckets=8)).save_pretrained(root / "t5")
    tokenizer.save_pretrained(root / "t5")
    CLIPVisionModel(tiny_clip_vision_config()).save_pretrained(root / "clip")
    default_image_processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip"
    )
    SiglipVisionModel(tiny_siglip_vision_config()).save_pretrained(root / "siglip")  # no preprocessor: defaults
    return root, encoder_state


def test_build_refuses_bad_inputs_before_writing(local_sources, tmp_path, capsys):
    root, _ = local_sources
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [
        (["--text", str(root / "missing.pth"), "--output-dir", str(tmp_path / "a")], "does not exist"),
        (["--text", str(root / "Epoch30.pth"), "--output-dir", str(tmp_path / "a")], "give --tokenizer"),
        (["--text", str(root / "Epoch30.pth"), "--tokenizer", str(root / "t5-tokenizer"), "--vision", str(root / "clip"),
          "--output-dir", str(tmp_path / "a")], "--new-visual-projection"),  # 16-d regions, 32-d CLIP patches
        (["--text", str(root / "t5"), "--output-dir", str(tmp_path / "full")], "not empty: pass --overwrite"),
        (["--text", str(root / "t5"), "--vision-feature-layer", "0", "--output-dir", str(tmp_path / "a")],
         "need a tower"),
    ]  # fmt: skip
    for argv, message in cases:
        try:
            code = main(["build", *argv])
        except SystemExit as exit_:
            code = exit_.code
        assert code == 2, argv
        assert message in capsys.readouterr().err, (argv, message)
    assert not (tmp_path / "a").exists()
    assert sorted(os.listdir(tmp_path)) == ["full"]  # no staging folder left behind


def test_build_vl_t5_checkpoint_keeps_its_features(local_sources, tmp_path):
    """--vision none: the model takes the precomputed features the checkpoint expects, and computes what the
    original VL-T5 encoder computes (independent reference on the source state dict)."""
    from transformers import AutoModel, AutoProcessor

    root, encoder_state = local_sources
    out = tmp_path / "vlt5-features"
    assert main(["build", "--text", str(root / "Epoch30.pth"), "--tokenizer", str(root / "t5-tokenizer"),
                 "--relative-attention-max-distance", "20", "--output-dir", str(out)]) == 0  # fmt: skip
    model = AutoModel.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.vision_config is None and model.config.feat_dim == 16
    generator = torch.Generator().manual_seed(0)
    feats, boxes = torch.randn(5, 16, generator=generator), torch.tensor([[0.1, 0.2, 0.6, 0.9]]).repeat(5, 1)
    batch = processor(text=["who designed this bridge"], visual_feats=[feats], boxes=[boxes], return_tensors="pt")
    with torch.no_grad():
        ours = model(**batch).last_hidden_state
    expected = reference_encoder(encoder_state, num_heads=4, num_buckets=8, max_distance=20,
                                 input_ids=batch["input_ids"], visual_feats=batch["visual_feats"],
                                 visual_pos=batch["visual_pos"])  # fmt: skip
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert "torch.Size([1, 32])" in run_snippet(card_snippet(out), tmp_path)


def test_build_with_siglip_and_with_a_new_visual_projection(local_sources, tmp_path):
    from transformers import AutoModel, AutoProcessor, SiglipVisionModel

    root, _ = local_sources
    out = tmp_path / "t5-siglip"
    assert main(["build", "--text", str(root / "t5"), "--vision", str(root / "siglip"), "--similarity", "dot",
                 "--projection-dim", "8", "--output-dir", str(out)]) == 0  # fmt: skip
    model, processor = AutoModel.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out)
    assert (model.config.similarity, model.config.logit_scale, model.config.projection_dim) == ("dot", 1.0, 8)
    photo = Image.fromarray(photos.chelsea())
    batch = processor(text=["which river flows here"], images=[photo], return_tensors="pt")
    tower = SiglipVisionModel.from_pretrained(root / "siglip").eval()
    with torch.no_grad():
        expected = tower(pixel_values=batch["pixel_values"].flatten(0, 1), output_hidden_states=True).hidden_states[-1]
        tokens = model.get_image_features(batch["pixel_values"])["visual_feats"]  # SigLIP has no CLS token
        assert model.encode(**batch).shape == (1, 8)
    torch.testing.assert_close(tokens, expected, atol=1e-6, rtol=0)
    assert "SigLIP" in (out / "README.md").read_text()

    vlt5_clip = tmp_path / "vlt5-clip"
    assert main(["build", "--text", str(root / "Epoch30.pth"), "--tokenizer", str(root / "t5-tokenizer"),
                 "--vision", str(root / "clip"), "--new-visual-projection", "--output-dir", str(vlt5_clip)]) == 0
    built = AutoModel.from_pretrained(vlt5_clip)
    assert built.config.feat_dim == 32 and built.config.vision_config.hidden_size == 32
    card = (vlt5_clip / "README.md").read_text()
    assert "freshly initialised visual projection" in card
    assert json.loads((vlt5_clip / "config.json").read_text())["auto_map"]["AutoModel"].endswith("JointEncoderModel")
    score = float(run_snippet(card_snippet(vlt5_clip), tmp_path).split()[-1])
    assert math.isfinite(score) and -1 <= score <= 1  # cosine
