"""CLIP-ResNet features from photos (issue 13): `extract-features` on an OpenAI-layout `RN*.pt` file equals an
independent run of VL-Adapter's procedure (tests/reference_clip_resnet.py's functional forward of openai/CLIP's code on
the SAME random weights, VL-Adapter's preprocessing written out here with PIL + numpy, its `permute(1, 2, 0).reshape`
layout); the in-model frozen ResNet tower equals the extracted features and loads through AutoModel with remote code;
global vectors (ResNet attention pool, CLIP ViT `get_image_features`) as one token; converted VL-Adapter / VL-T5
fixtures fed end to end through encode + search; mismatching features refused with a clear message."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import randomize_, tiny_config_kwargs
from PIL import Image
from reference_clip_resnet import random_openai_visual_state_dict, reference_forward
from skimage import data as skdata
from test_conversion import original_checkpoint
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

from conversion.convert_vl_t5_checkpoint import convert
from vl_joint_encoder import JointEncoderConfig, JointEncoderModel, JointEncoderProcessor
from vl_joint_encoder.data.extraction import extract_features
from vl_joint_encoder.data.feature_stores import ExtractedFeatureStore, open_feature_store
from vl_joint_encoder.data.inputs import JointEncoderInputBuilder
from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer
from vl_joint_encoder.vision import attach_vision_tower, load_vision_tower


TINY_RN = dict(layers=(1, 1, 1, 1), width=2, image_size=224, output_dim=8)  # 64-d grid tokens, 7 x 7 at 224 px
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
PHOTOS = {"astronaut": skdata.astronaut, "coffee": skdata.coffee, "chelsea": skdata.chelsea, "rocket": skdata.rocket,
          "camera": skdata.camera}  # fmt: skip  (camera: a greyscale photo, converted to RGB first)
TEXTS = ["who is the astronaut", "what is in the cup", "which animal is this", "a rocket on its pad", "a camera man"]


def vl_adapter_pixels(path):
    """ylsung/VL_adapter feature_extraction/coco_CLIP.py, written out: Image.open(...).convert("RGB"),
    Resize((224, 224), BICUBIC), CenterCrop((224, 224)) (no-op), ToTensor, then `-= mean; /= std`."""
    image = Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0  # (224, 224, 3)
    return torch.from_numpy(((array - MEAN) / STD).transpose(2, 0, 1).copy())


def vl_adapter_grid(sd, path):
    """`tmp_att, _ = model.encode_image(image); tmp_att[0].permute(1, 2, 0).reshape(49, -1)`."""
    grid, pooled, _ = reference_forward(sd, vl_adapter_pixels(path)[None])
    return grid[0].permute(1, 2, 0).reshape(grid.shape[-1] ** 2, -1), pooled[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rn")
    photos = root / "photos"
    photos.mkdir()
    for name, load in PHOTOS.items():
        Image.fromarray(load()).save(photos / f"{name}.jpg", quality=95)
    sd = random_openai_visual_state_dict(**TINY_RN, seed=3)
    torch.save(sd, root / "RN101.pt")  # a plain state dict in the OpenAI layout (the archives load the same way)
    tokenizer = train_vl_t5_tokenizer(TEXTS * 20, vocab_size=60)
    return root, photos, sd, tokenizer


def test_extracted_grids_equal_vl_adapters_procedure_on_the_same_weights(world):
    root, photos, sd, _ = world
    manifest = extract_features(
        str(photos), str(root / "grids"), str(root / "RN101.pt"), preprocessing="vl_adapter", batch_size=2,
        shard_size=3,
    )  # fmt: skip
    extractor = manifest["extractor"]
    assert manifest["complete"] and extractor["tower_class"] == "CLIPResNetVisionModel"
    assert extractor["box_mode"] == "zeros" and extractor["image_processor"]["mode"] == "vl_adapter"
    store = ExtractedFeatureStore(root / "grids")
    assert sorted(store.keys()) == sorted(PHOTOS)
    for name in PHOTOS:
        expected_grid, expected_pooled = vl_adapter_grid(sd, photos / f"{name}.jpg")
        entry = store[name]
        assert entry["visual_feats"].shape == (49, 64) and entry["visual_feats"].dtype == np.float32
        np.testing.assert_allclose(entry["visual_feats"], expected_grid.numpy(), rtol=1e-5, atol=1e-5)
        assert not np.any(entry["visual_pos"])  # VL-Adapter's loaders: torch.zeros(49, 4)
        # the attention pool (what ViQuAE's clip-RN50 vectors are): pooler_output = image_embeds
        np.testing.assert_allclose(entry["pooled"], expected_pooled.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(entry["image_embeds"], entry["pooled"])


def test_clip_preprocessing_and_global_token(world):
    """'clip' preprocessing (OpenAI's _transform: shortest edge 224, center crop) and tokens='global': the attention
    pool as ONE token with the whole-image box, against the reference on independently preprocessed pixels."""
    root, photos, sd, _ = world
    manifest = extract_features(str(photos), str(root / "global"), str(root / "RN101.pt"), tokens="global")
    assert manifest["extractor"]["tokens"] == "global" and manifest["extractor"]["box_mode"] == "grid"
    store = ExtractedFeatureStore(root / "global")
    for name in ("astronaut", "rocket"):  # rocket: 640 x 427 -> 335 x 224, crop left = round(55.5) = 56
        image = Image.open(photos / f"{name}.jpg")
        w, h = image.size
        short, long = min(w, h), max(w, h)
        size = (224, int(224 * long / short)) if w <= h else (int(224 * long / short), 224)
        resized = image.resize(size, Image.BICUBIC)
        left, top = int(round((size[0] - 224) / 2)), int(round((size[1] - 224) / 2))
        array = np.asarray(resized.crop((left, top, left + 224, top + 224)).convert("RGB"), dtype=np.float32) / 255.0
        pixels = torch.from_numpy(((array - MEAN) / STD).transpose(2, 0, 1).copy())[None]
        _, pooled, _ = reference_forward(sd, pixels)
        entry = store[name]
        assert entry["visual_feats"].shape == (1, 8)
        np.testing.assert_allclose(entry["visual_feats"][0], pooled[0].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(entry["visual_pos"], [[0.0, 0.0, 1.0, 1.0]])


def test_clip_vit_global_vector_is_get_image_features(tmp_path):
    """A full CLIP checkpoint: tokens='global' writes CLIPModel.get_image_features (visual_projection of the pooled
    CLS), computed here by transformers' own CLIPModel on the processor's pixels."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("coffee", "chelsea"):
        Image.fromarray(PHOTOS[name]()).save(photos / f"{name}.png")
    config = CLIPConfig(
        text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 20},
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
                       "image_size": 32, "patch_size": 8},
        projection_dim=12,
    )  # fmt: skip
    torch.manual_seed(0)
    clip = randomize_(CLIPModel(config)).eval()
    clip.save_pretrained(tmp_path / "clip")
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "clip")
    extract_features(str(photos), str(tmp_path / "out"), str(tmp_path / "clip"), tokens="global")
    store = ExtractedFeatureStore(tmp_path / "out")
    for name in ("coffee", "chelsea"):
        pixels = processor(images=[Image.open(photos / f"{name}.png")], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            expected = clip.get_image_features(pixel_values=pixels)
        expected = getattr(expected, "pooler_output", expected)[0]
        np.testing.assert_allclose(store[name]["visual_feats"][0], expected.numpy(), rtol=1e-5, atol=1e-5)
        assert store[name]["visual_feats"].shape == (1, 12)


def test_in_model_resnet_tower_equals_extracted_features_and_loads_as_remote_code(world, tmp_path):
    root, photos, sd, tokenizer = world
    tower = load_vision_tower(root / "RN101.pt")
    tower.config.preprocessing = "vl_adapter"
    config = JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer), feat_dim=64), visual_downsample_size=6)
    torch.manual_seed(1)
    text_model = randomize_(JointEncoderModel(config)).eval()
    model = attach_vision_tower(text_model, tower, vision_box_mode="zeros")
    assert type(model.vision_model).__name__ == "CLIPResNetVisionModel"
    processor = JointEncoderProcessor.from_model_config(model.config, tokenizer)
    model.save_pretrained(tmp_path / "pipeline")
    processor.save_pretrained(tmp_path / "pipeline")
    assert (tmp_path / "pipeline" / "clip_resnet.py").is_file()  # shipped with the remote code

    extract_features(str(photos), str(tmp_path / "feats"), str(tmp_path / "pipeline"))
    store = ExtractedFeatureStore(tmp_path / "feats")
    names = ["astronaut", "rocket", "camera"]
    images = [[Image.open(photos / f"{n}.jpg")] for n in names]
    batch = processor(text=TEXTS[:3], images=images, return_tensors="pt")
    with torch.no_grad():
        tower_inputs = model.get_image_features(batch["pixel_values"])
        from_pixels = model.encode(**batch)
    for row, name in enumerate(names):  # the model's own tower path = the extracted grid = the reference
        np.testing.assert_array_equal(tower_inputs["visual_feats"][row].numpy(), store[name]["visual_feats"])
        expected_grid, _ = vl_adapter_grid(sd, photos / f"{name}.jpg")
        np.testing.assert_allclose(store[name]["visual_feats"], expected_grid.numpy(), rtol=1e-5, atol=1e-5)
    builder = JointEncoderInputBuilder(processor, 64, store)
    with torch.no_grad():
        from_features = model.encode(**builder(TEXTS[:3], names))
    torch.testing.assert_close(from_features, from_pixels, rtol=0, atol=1e-6)

    # where the package is not installed: AutoModel / AutoProcessor with remote code, same photos, same embedding
    script = textwrap.dedent(f"""
        import sys
        sys.modules["vl_joint_encoder"] = None  # any import of the package now fails
        import torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        folder = {str(tmp_path / "pipeline")!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(model.vision_model).__name__ == "CLIPResNetVisionModel"
        images = [[Image.open({str(photos)!r} + "/" + n + ".jpg")] for n in {names!r}]
        with torch.no_grad():
            print(model.encode(**processor(text={TEXTS[:3]!r}, images=images, return_tensors="pt")).tolist())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    from_remote = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(from_remote, from_pixels, rtol=0, atol=1e-6)


def _converted(root, tokenizer, name, **checkpoint_kwargs):
    state = original_checkpoint(seed=2, vocab_size=len(tokenizer), **checkpoint_kwargs)[0]
    torch.save(state, root / f"{name}.pth")
    tokenizer.save_pretrained(root / "tokenizer")
    adapter = {"adapter_task": "vqa"} if checkpoint_kwargs.get("tasks") else {}
    convert(root / f"{name}.pth", root / name, tokenizer=str(root / "tokenizer"), **adapter)
    return root / name


def _encode_and_search(root, model_dir, store, keys, tag):
    from vl_joint_encoder.commands.encode import main as encode_main
    from vl_joint_encoder.commands.search import main as search_main

    kb = root / f"kb-{tag}.jsonl"
    kb.write_text("".join(json.dumps({"id": f"p{i}", "text": t, "image": k}) + "\n"
                          for i, (t, k) in enumerate(zip(TEXTS, keys))))  # fmt: skip
    queries = root / f"queries-{tag}.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "question": t, "image": k}) + "\n"
                               for i, (t, k) in enumerate(zip(TEXTS[::-1], keys[::-1]))))  # fmt: skip
    assert encode_main(["--model", str(model_dir), "--kb", str(kb), "--feature-store", str(store),
                        "--output-dir", str(root / f"emb-{tag}"), "--batch-size", "2"]) == 0  # fmt: skip
    assert search_main(["--model", str(model_dir), "--queries", str(queries), "--embeddings", str(root / f"emb-{tag}"),
                        "--feature-store", str(store), "--k", "3", "--output", str(root / f"run-{tag}.json")]) == 0  # fmt: skip
    run = json.loads((root / f"run-{tag}.json").read_text())
    assert set(run) == {f"q{i}" for i in range(len(TEXTS))}
    scores = [s for hits in run.values() for s in hits.values()]
    assert len(scores) == 3 * len(TEXTS) and np.isfinite(scores).all()


def test_converted_vl_adapter_from_photos_end_to_end(world):
    """A converted VL-Adapter checkpoint (49-token CLIP grids, 6x6 downsampling inside) fed from photos: extract with
    VL-Adapter's preprocessing, then encode + search run and give finite scores; the card names the features."""
    root, photos, _, tokenizer = world
    model_dir = _converted(root, tokenizer, "vladapter", tasks=("vqa", "gqa"), feat_dim=64)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["visual_features"]["kind"] == "clip_grid" and config["visual_features"]["num_tokens"] == 49
    card = (model_dir / "README.md").read_text()
    assert "## Visual features" in card and "--preprocessing vl_adapter" in card
    extract_features(str(photos), str(root / "vladapter-feats"), str(root / "RN101.pt"), preprocessing="vl_adapter")
    _encode_and_search(root, model_dir, root / "vladapter-feats", sorted(PHOTOS), "vladapter")

    # the wrong features are refused where the store meets the model, with the reason and the fix
    model = JointEncoderModel.from_pretrained(model_dir)
    processor = JointEncoderProcessor.from_pretrained(model_dir)
    expected = model.config.visual_features
    clip_crop = root / "global"  # 'clip' preprocessing, global tokens (test above) or re-made here
    if not (clip_crop / "manifest.json").exists():
        extract_features(str(photos), str(clip_crop), str(root / "RN101.pt"), tokens="global")
    with pytest.raises(ValueError, match="kind='global'.*clip_grid"):
        JointEncoderInputBuilder(processor, 32, clip_crop, expected_features=expected)
    extract_features(str(photos), str(root / "crop-grid"), str(root / "RN101.pt"), preprocessing="clip")
    with pytest.raises(ValueError, match="preprocessing='clip'.*'vl_adapter'.*extract-features"):
        JointEncoderInputBuilder(processor, 32, root / "crop-grid", expected_features=expected)
    store = {"few": np.ones((36, 64), np.float32), "wide": np.ones((49, 32), np.float32)}
    builder = JointEncoderInputBuilder(processor, 32, store, expected_features=expected)
    with pytest.raises(ValueError, match="36 visual tokens, but this checkpoint needs 49 per image"):
        builder(["a"], ["few"])
    with pytest.raises(ValueError, match="32-d visual features, but this checkpoint needs 64-d"):
        builder(["a"], ["wide"])


def test_converted_vl_t5_takes_regions_with_boxes_and_refuses_grids(world):
    """VL-T5 needs 36 Faster R-CNN regions with boxes: no detector installs here (README), so the route is the
    *_obj36.h5 layout. A file in that layout runs end to end; a CLIP grid or boxless regions are refused."""
    h5py = pytest.importorskip("h5py")
    root, photos, _, tokenizer = world
    model_dir = _converted(root, tokenizer, "vlt5", feat_dim=64)
    features = json.loads((model_dir / "config.json").read_text())["visual_features"]
    assert features["kind"] == "faster_rcnn" and features["boxes"] is True and features["num_tokens"] == 36
    rng = np.random.default_rng(0)
    with h5py.File(root / "val2014_obj36.h5", "w") as f:
        for name, load in PHOTOS.items():
            h, w = load().shape[:2]
            group = f.create_group(name)
            xy = rng.uniform(0, 0.5, (36, 2)) * [w, h]
            group["boxes"] = np.concatenate([xy, xy + rng.uniform(0.1, 0.5, (36, 2)) * [w, h]], 1).astype(np.float32)
            group["features"] = rng.standard_normal((36, 64)).astype(np.float32)
            group["img_w"], group["img_h"] = w, h
    _encode_and_search(root, model_dir, root / "val2014_obj36.h5", sorted(PHOTOS), "vlt5")

    model = JointEncoderModel.from_pretrained(model_dir)
    processor = JointEncoderProcessor.from_pretrained(model_dir)
    extract_features(str(photos), str(root / "grid-for-t5"), str(root / "RN101.pt"), preprocessing="vl_adapter")
    with pytest.raises(ValueError, match="kind='clip_grid'.*36 bottom-up-attention regions"):
        JointEncoderInputBuilder(processor, 32, root / "grid-for-t5", expected_features=model.config.visual_features)
    boxless = JointEncoderInputBuilder(processor, 32, {"x": np.ones((36, 64), np.float32)},
                                       expected_features=model.config.visual_features)  # fmt: skip
    with pytest.raises(ValueError, match="no boxes.*needs each region's box"):
        boxless(["a"], ["x"])
    assert open_feature_store(root / "val2014_obj36.h5")["coffee"]["visual_feats"].shape == (36, 64)


def test_training_refuses_features_the_converted_checkpoint_was_not_trained_on(world, tmp_path):
    """The same check when training starts: JointEncoderTrainer's collator gets config.visual_features, so a
    converted VL-T5 (36 regions with boxes) is refused a CLIP-grid store before the first step."""
    from vl_joint_encoder.training.arguments import JointEncoderTrainingArguments
    from vl_joint_encoder.training.trainer import JointEncoderTrainer

    root, photos, _, tokenizer = world
    model_dir = _converted(root, tokenizer, "vlt5-train", feat_dim=64)
    if not (root / "grid-for-t5-train" / "manifest.json").exists():
        extract_features(str(photos), str(root / "grid-for-t5-train"), str(root / "RN101.pt"), preprocessing="vl_adapter")
    model = JointEncoderModel.from_pretrained(model_dir)
    processor = JointEncoderProcessor.from_pretrained(model_dir)
    kb = [{"id": f"p{i}", "text": text, "image": name} for i, (name, text) in enumerate(zip(sorted(PHOTOS), TEXTS))]
    queries = [{"id": f"q{i}", "question": text, "image": name, "positive_ids": [f"p{i}"]}
               for i, (name, text) in enumerate(zip(sorted(PHOTOS), TEXTS))]  # fmt: skip
    args = JointEncoderTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=1,
                                         per_device_train_batch_size=2, n_hard_negatives=0)  # fmt: skip
    with pytest.raises(ValueError, match="kind='clip_grid'.*36 bottom-up-attention regions"):
        JointEncoderTrainer(model=model, args=args, train_dataset=queries, kb=kb, processing_class=processor,
                            feature_store=root / "grid-for-t5-train")  # fmt: skip
