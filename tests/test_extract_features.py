"""extract-features: written features equal the tower path, resumable runs equal uninterrupted ones, both formats."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import randomize_, tiny_config_kwargs
from PIL import Image
from skimage import data as skdata

from vl_joint_encoder import JointEncoderConfig, JointEncoderModel, JointEncoderProcessor
from vl_joint_encoder.commands.extract_features import main
from vl_joint_encoder.data.extraction import extract_features
from vl_joint_encoder.data.feature_stores import ExtractedFeatureStore as FeatureStore
from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer
from vl_joint_encoder.vision import tiny_clip_vision_config


PHOTOS = {"astronaut": skdata.astronaut, "coffee": skdata.coffee, "chelsea": skdata.chelsea, "sub/rocket": skdata.rocket}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for name, load in PHOTOS.items():
        Image.fromarray(load()).save(images / f"{name}.{'png' if name == 'coffee' else 'jpg'}")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    tokenizer = train_vl_t5_tokenizer(["what is in this photo"] * 20, vocab_size=40)
    config = JointEncoderConfig(
        **tiny_config_kwargs(vocab_size=len(tokenizer), feat_dim=32),
        vision_config=tiny_clip_vision_config(),
        vision_feature_select="cls_patch",
    )
    torch.manual_seed(0)
    model = randomize_(JointEncoderModel(config)).eval()
    model.save_pretrained(root / "model")
    JointEncoderProcessor.from_model_config(config, tokenizer).save_pretrained(root / "model")
    return root, images, model


def run(setup, output, **kwargs):
    root, images, _ = setup
    kwargs = {"shard_size": 2, "batch_size": 1, "on_error": "skip", **kwargs}
    return extract_features(str(images), str(root / output), str(root / "model"), **kwargs)


def test_features_fed_back_equal_the_tower_path(setup):
    root, images, model = setup
    manifest = run(setup, "full")
    assert manifest["complete"] and manifest["extractor"]["feature_select"] == "cls_patch"
    assert [f["id"] for f in manifest["failures"]] == ["broken"]
    assert "broken.jpg" in manifest["failures"][0]["reason"]
    store = FeatureStore(str(root / "full"))
    assert sorted(store.keys()) == ["astronaut", "chelsea", "coffee", "sub/rocket"]
    processor = JointEncoderProcessor.from_pretrained(root / "model")
    ids = ["astronaut", "sub/rocket", "coffee"]
    paths = [str(images / f"{i}.{'png' if i == 'coffee' else 'jpg'}") for i in ids]
    texts = ["what is in this photo"] * 3
    with torch.no_grad():
        from_pixels = model(**processor(text=texts, images=paths)).pooler_output
        items = [store[i] for i in ids]
        assert items[0]["visual_feats"].shape == (17, 32) and items[0]["pooled"].shape == (32,)
        np.testing.assert_array_equal(items[0]["visual_pos"][0], [0, 0, 1, 1])  # CLS box, then the 4 x 4 grid
        np.testing.assert_allclose(items[0]["visual_pos"][6], [0.25, 0.25, 0.5, 0.5])  # row 1, column 1
        batch = processor(text=texts, visual_feats=[x["visual_feats"] for x in items],
                          boxes=[x["visual_pos"] for x in items])
        from_features = model(**batch).pooler_output
    torch.testing.assert_close(from_features, from_pixels, atol=1e-5, rtol=0)
    # pooled = CLIP's post-layernorm CLS (transformers' own pooler_output)
    pixel_values = processor(text=texts[:1], images=paths[:1])["pixel_values"][:, 0]
    with torch.no_grad():
        reference = model.vision_model(pixel_values=pixel_values).pooler_output[0]
    np.testing.assert_allclose(items[0]["pooled"], reference.numpy(), atol=1e-5)


def test_resumed_run_equals_uninterrupted_run(setup):
    root = setup[0]
    run(setup, "whole")
    first = run(setup, "resumed", max_shards=1)
    assert not first["complete"] and len(first["shards"]) == 1
    # a crash while writing shard 1 left a half-written temporary file: it must be ignored and replaced
    (root / "resumed" / "shard-00001.safetensors.tmp").write_bytes(b"half a shard")
    second = run(setup, "resumed")
    assert second["complete"]
    whole = json.loads((root / "whole" / "manifest.json").read_text())
    assert second["shards"] == whole["shards"] and second["failures"] == whole["failures"]
    files = sorted(os.listdir(root / "whole"))
    assert files == sorted(os.listdir(root / "resumed"))
    assert not any(name.endswith(".tmp") for name in files)
    for name in files:
        if name.endswith(".safetensors"):
            assert (root / "whole" / name).read_bytes() == (root / "resumed" / name).read_bytes(), name
    with pytest.raises(ValueError, match="another extraction.*shard_size"):
        run(setup, "resumed", shard_size=3)


def test_arrow_format_from_a_datasets_column(setup):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    root, images, _ = setup
    dataset = Dataset.from_dict(
        {"image_id": ["a", "c"], "image": [str(images / "astronaut.jpg"), str(images / "chelsea.jpg")]},
        features=Features({"image_id": Value("string"), "image": ImageFeature()}),
    )
    manifest = extract_features(dataset, str(root / "arrow"), str(root / "model"), id_column="image_id",
                                output_format="arrow", shard_size=1)
    assert manifest["complete"] and os.path.isdir(root / "arrow" / "shard-00001")
    store, reference = FeatureStore(str(root / "arrow")), FeatureStore(str(root / "full"))
    for image_id, name in (("a", "astronaut"), ("c", "chelsea")):
        for key in ("visual_feats", "visual_pos", "pooled"):
            np.testing.assert_allclose(store[image_id][key], reference[name][key], atol=1e-6)
    with pytest.raises(ValueError, match="no column 'picture'"):
        extract_features(dataset, str(root / "arrow2"), str(root / "model"), image_column="picture")


def test_cli(setup, capsys):
    root, images, _ = setup
    args = ["--images", str(images), "--model", str(root / "model"), "--shard-size", "3"]
    assert main(args + ["--output", str(root / "cli"), "--skip-bad-images"]) == 0
    out = capsys.readouterr().out
    assert "4 images in 2 shards" in out and "skipped broken" in out
    assert main(args + ["--output", str(root / "cli2")]) == 2  # the broken file, without --skip-bad-images
    assert "broken.jpg" in capsys.readouterr().err
    assert main(args + ["--output", str(root / "cli3"), "--feature-select", "patch"]) == 2
    assert "would not match" in capsys.readouterr().err
    assert main(["--images", str(root / "nope"), "--model", str(root / "model"), "--output", str(root / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
