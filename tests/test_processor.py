"""JointEncoderProcessor: tokenizer + CLIP image processor (PIL backend), precomputed features, save/load."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_config_kwargs
from PIL import Image
from skimage import data as skdata
from transformers import AutoProcessor

from vl_joint_encoder import JointEncoderConfig, JointEncoderModel, JointEncoderProcessor
from vl_joint_encoder.images import ImageLoadError
from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer


CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
TEXTS = ["who is the person in this photo", "what is in the cup", "a cat sitting on a chair", "rocket launch pad"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_vl_t5_tokenizer(TEXTS * 20, vocab_size=60)


@pytest.fixture(scope="module")
def photos():
    return {
        "astronaut": Image.fromarray(skdata.astronaut()),
        "coffee": Image.fromarray(skdata.coffee()),
        "chelsea": Image.fromarray(skdata.chelsea()),
    }


def processor_for(tokenizer, **kwargs):
    from transformers import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return JointEncoderProcessor(image_processor, tokenizer, **kwargs)


def clip_pixels_by_hand(image: Image.Image, size: int) -> np.ndarray:
    """CLIP preprocessing written out: bicubic resize of the short side, centre crop, rescale, normalise."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = (size, int(round(height * scale))) if width <= height else (int(round(width * scale)), size)
    resized = image.convert("RGB").resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    crop = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float64) / 255.0  # (H, W, 3)
    return ((crop - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)  # (3, H, W)


def test_text_and_images_several_per_query(tokenizer, photos):
    processor = processor_for(tokenizer, n_images=2)
    batch = processor(
        text=TEXTS[:3], images=[photos["astronaut"], [photos["coffee"], photos["chelsea"]], None], return_tensors="pt"
    )
    assert batch["pixel_values"].shape == (3, 2, 3, 32, 32)
    assert batch["pixel_attention_mask"].tolist() == [[1, 0], [1, 1], [0, 0]]
    reference = tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["attention_mask"], reference["attention_mask"])
    for (q, i), name in {(0, 0): "astronaut", (1, 0): "coffee", (1, 1): "chelsea"}.items():
        expected = torch.from_numpy(clip_pixels_by_hand(photos[name], 32)).float()
        # PIL's resampling is the same; rounding to uint8 may differ by one level after resize
        assert torch.allclose(batch["pixel_values"][q, i], expected, atol=2.5 / 255 / CLIP_STD.min())
    assert batch["pixel_values"][0, 1].abs().sum() == 0 and batch["pixel_values"][2].abs().sum() == 0


def test_image_modes_and_paths(tokenizer, photos, tmp_path):
    processor = processor_for(tokenizer)
    rgb = photos["chelsea"]
    path = tmp_path / "cat.png"
    rgb.save(path)
    from_path = processor(text="a cat", images=str(path))["pixel_values"]
    from_pil = processor(text="a cat", images=rgb)["pixel_values"]
    assert torch.equal(from_path, from_pil)
    gray = processor(text="a cat", images=rgb.convert("L"))["pixel_values"][0, 0]  # (3, 32, 32)
    assert torch.allclose(gray[0] * CLIP_STD[0] + CLIP_MEAN[0], gray[1] * CLIP_STD[1] + CLIP_MEAN[1], atol=1e-5)
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        processor(text="x", images=str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match="one entry per query"):
        processor(text=["a", "b"], images=[rgb])
    with pytest.raises(ValueError, match="n_images=1"):
        processor_for(tokenizer, n_images=1)(text=["a"], images=[[rgb, rgb]])


def test_precomputed_features_boxes_normalised_by_hand(tokenizer):
    processor = processor_for(tokenizer, feat_dim=6, clamp_boxes=True)  # the overshooting box is clipped, not refused
    rng = np.random.default_rng(0)
    feats_a = rng.normal(size=(3, 6)).astype(np.float32)
    feats_b1, feats_b2 = rng.normal(size=(2, 6)).astype(np.float32), rng.normal(size=(1, 6)).astype(np.float32)
    boxes_a = np.array([[10, 20, 110, 70], [-3, -2, 201, 101], [0, 0, 200, 100]], dtype=np.float32)  # image 200 x 100
    boxes_b1 = np.array([[0, 0, 5, 5], [5, 5, 10, 10]], dtype=np.float32)  # image 10 x 10
    boxes_b2 = np.array([[0.1, 0.2, 0.3, 0.4]], dtype=np.float32)  # normalised already (image_size None)
    batch = processor(
        text=TEXTS[:3],
        visual_feats=[feats_a, [feats_b1, feats_b2], None],
        boxes=[boxes_a, [boxes_b1, boxes_b2], None],
        image_size=[(200, 100), [(10, 10), None], None],
        return_tensors="pt",
    )
    expected_pos = torch.tensor(
        [
            [[0.05, 0.2, 0.55, 0.7], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]],  # second box clamped (clamp_boxes)
            [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.1, 0.2, 0.3, 0.4]],
            [[0.0] * 4] * 3,
        ]
    )
    assert torch.allclose(batch["visual_pos"], expected_pos, atol=1e-6)
    assert batch["visual_attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert batch["image_order_ids"].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 0]]
    assert batch["object_order_ids"].tolist() == [[0, 1, 2], [0, 1, 0], [0, 0, 0]]
    assert torch.equal(batch["visual_feats"][0], torch.from_numpy(feats_a))
    assert torch.equal(batch["visual_feats"][1], torch.from_numpy(np.concatenate([feats_b1, feats_b2])))
    assert batch["visual_feats"][2].abs().sum() == 0
    # the model takes the batch as is
    config = JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer), feat_dim=6))
    output = JointEncoderModel(config).eval()(**batch)
    assert output.pooler_output.shape == (3, 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(visual_feats=[np.ones((2, 5))]), "feat_dim=6"),
        (dict(visual_feats=[np.array([[np.nan] * 6, [0] * 6])]), "NaN"),
        (dict(visual_feats=[np.full((1, 6), np.inf)]), "NaN/infinite"),
        (dict(visual_feats=[np.ones((1, 6))], boxes=[[[0, 0, 100, 300]]], image_size=[(100, 200)]), "outside"),
        (dict(visual_feats=[np.ones((1, 6))], boxes=[[[0, 0, 100, 300]]], image_size=[(200, 100)]), "width, height"),
        (dict(visual_feats=[np.ones((1, 6))], boxes=[[[50, 0, 10, 30]]], image_size=[(100, 100)]), "x2 < x1"),
        (dict(visual_feats=[np.ones((1, 6))], boxes=[[[0, 0, np.nan, 1]]]), "NaN"),
        (dict(visual_feats=[np.ones((1, 6))], boxes=[[[0, 0, 20, 30]]]), "pass image_size"),
        (dict(visual_feats=[np.ones((2, 6))], boxes=[[[0, 0, 1, 1]]]), "boxes have 1"),
        (dict(visual_feats=[np.ones((6,))]), "num_tokens, feat_dim"),
        (dict(visual_feats=[[np.ones((1, 6))] * 3]), "n_images=2"),
        (dict(visual_feats=[np.ones((1, 6))], images=[None]), "not both"),
        (dict(boxes=[[[0, 0, 1, 1]]]), "without visual_feats"),
        (dict(visual_feats=[np.ones((1, 6))], image_size=[(0, 10)], boxes=[[[0, 0, 1, 1]]]), "width, height"),
    ],
)
def test_bad_feature_inputs(tokenizer, kwargs, message):
    processor = processor_for(tokenizer, feat_dim=6, n_images=2)
    with pytest.raises(ValueError, match=message):
        processor(text=["x"], **kwargs)


def test_save_load_round_trip_auto_processor(tokenizer, photos, tmp_path):
    processor = processor_for(tokenizer, feat_dim=6, n_images=2, box_tolerance=0.1, clamp_boxes=True,
                              text_prefix="vqa: ", mask_pad_tokens=False)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is JointEncoderProcessor
    assert (loaded.feat_dim, loaded.n_images, loaded.box_tolerance) == (6, 2, 0.1)
    assert (loaded.clamp_boxes, loaded.text_prefix, loaded.add_text_prefix, loaded.mask_pad_tokens) == (
        True, "vqa: ", True, False
    )
    assert type(loaded.image_processor).__name__ == "CLIPImageProcessorPil"  # works without torchvision
    inputs = dict(text=TEXTS[:2], images=[photos["astronaut"], [photos["coffee"], photos["chelsea"]]])
    before, after = processor(**inputs), loaded(**inputs)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_remote_code_processor_loads_without_the_package(tokenizer, tmp_path):
    """save_pretrained copies the processor (and images.py) as remote code; a process that cannot import
    vl_joint_encoder loads processor + model with trust_remote_code and runs them."""
    processor = processor_for(tokenizer, feat_dim=16)
    config = JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer)))
    model = JointEncoderModel(config).eval()
    processor.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    assert {"processing_joint_encoder.py", "images.py", "processor_config.json"} <= set(os.listdir(tmp_path))
    feats = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    boxes = [[0, 0, 10, 10], [5, 5, 20, 20], [0, 0, 40, 20]]
    with torch.no_grad():
        expected = model(**processor(text=["who is this"], visual_feats=[feats], boxes=[boxes], image_size=[(40, 20)]))
    np.save(tmp_path / "feats.npy", feats)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["vl_joint_encoder"] = None  # the package must not be importable
        import numpy as np, torch
        from transformers import AutoModel, AutoProcessor
        processor = AutoProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        feats = np.load({str(tmp_path / "feats.npy")!r})
        batch = processor(text=["who is this"], visual_feats=[feats], boxes=[{boxes!r}], image_size=[(40, 20)])
        with torch.no_grad():
            print(type(processor).__module__.startswith("transformers_modules"), model(**batch).pooler_output.tolist())
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    flag, values = result.stdout.strip().split(" ", 1)
    assert flag == "True"
    assert torch.allclose(torch.tensor(eval(values)), expected.pooler_output, atol=1e-6)


# ---------------------------------------------------------------------------- inputs as the original loaders build them
def test_attention_mask_is_input_ids_not_pad_as_the_original_encoder(tokenizer):
    """The originals pass no text mask: their encoders use `input_ids != pad` (j-min/VL-T5 modeling_t5.py), so a
    literal <pad> in a question is masked out. The processor does the same unless mask_pad_tokens=False."""
    texts = ["what is <pad> in the cup", "who is this"]
    ids = [tokenizer.encode(t) for t in texts]  # the originals' tokenizer.encode: </s> appended, <pad> -> id 0
    assert 0 in ids[0][:-1]
    longest = max(map(len, ids))
    padded = torch.zeros(2, longest, dtype=torch.long)  # the collate: ones * pad_token_id, then each row's ids
    for row, row_ids in enumerate(ids):
        padded[row, : len(row_ids)] = torch.tensor(row_ids)
    batch = processor_for(tokenizer)(text=texts, return_tensors="pt")
    assert torch.equal(batch["input_ids"], padded)
    assert torch.equal(batch["attention_mask"], (padded != 0).long())
    assert batch["attention_mask"][0, ids[0].index(0)] == 0
    kept = processor_for(tokenizer, mask_pad_tokens=False)(text=texts, return_tensors="pt")
    assert torch.equal(kept["attention_mask"], tokenizer(texts, padding=True, return_tensors="pt")["attention_mask"])
    assert kept["attention_mask"][0, ids[0].index(0)] == 1
    # and the model: with the processor's mask, the literal <pad> is a removed token, as in the original encoder
    model = JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer)))).eval()
    with torch.no_grad():
        ours = model(**batch).pooler_output
        default = model(input_ids=batch["input_ids"]).pooler_output  # the model's own default mask
    torch.testing.assert_close(ours, default, atol=0, rtol=0)


def test_text_prefix_of_the_source_task_is_prepended_unless_turned_off(tokenizer):
    config = JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer), text_prefix="vqa: "))
    processor = JointEncoderProcessor.from_model_config(config, tokenizer)
    assert processor.text_prefix == "vqa: "
    batch = processor(text=["what is in the cup"], return_tensors="pt")
    assert batch["input_ids"][0].tolist() == tokenizer.encode("vqa: what is in the cup")  # f"vqa: {question}"
    off = processor(text=["what is in the cup"], add_text_prefix=False, return_tensors="pt")
    assert off["input_ids"][0].tolist() == tokenizer.encode("what is in the cup")
    assert processor_for(tokenizer, text_prefix="vqa: ", add_text_prefix=False)(text="what")["input_ids"][0].tolist() == (
        tokenizer.encode("what")
    )
    with pytest.raises(ValueError, match="text_prefix must be a string"):
        processor_for(tokenizer, text_prefix=3)


def test_box_tolerance_is_the_originals_and_clamping_is_an_option(tokenizer):
    """VL-T5's loaders: boxes / (w, h) in float32, `assert_array_less(boxes, 1 + 1e-5)` and
    `assert_array_less(-boxes, 0 + 1e-5)` (strict, float32), then clamp to [0, 1]."""
    processor = processor_for(tokenizer, feat_dim=6)
    feats = [np.ones((2, 6), np.float32)]

    def pos(boxes, size=(640, 480), **kwargs):
        return processor_for(tokenizer, feat_dim=6, **kwargs)(
            text=["x"], visual_feats=feats, boxes=[np.array(boxes, np.float32)], image_size=[size], return_tensors="np"
        )["visual_pos"][0]

    # 640.005 / 640 = 1.0000078 < 1 + 1e-5: accepted, then clamped to 1 (as the original)
    np.testing.assert_array_equal(pos([[0, 0, 640.005, 480], [64, 48, 320, 240]]),
                                  np.array([[0, 0, 1, 1], [0.1, 0.1, 0.5, 0.5]], np.float32))
    with pytest.raises(ValueError, match=r"boxes\[0\]: box 1 \(-1.0, 0.0, 320.0, 240.0\) \(normalised .*lies outside"):
        pos([[0, 0, 10, 10], [-1, 0, 320, 240]])  # -1 / 640 = -0.0016: beyond the tolerance
    with pytest.raises(ValueError, match="clamp_boxes=True"):
        pos([[0, 0, 641, 480], [0, 0, 1, 1]])
    np.testing.assert_array_equal(pos([[-1, 0, 641, 480], [0, 0, 1, 1]], clamp_boxes=True)[0], [0, 0, 1, 1])
    np.testing.assert_array_equal(pos([[0, 0, 641, 480], [0, 0, 1, 1]], box_tolerance=0.01)[0], [0, 0, 1, 1])
    # the exact boundary, in float32 as the original compares: 1 + 1e-5 itself is refused (strict), the float32 below
    # it accepted; x = -float32(1e-5) refused
    below = float(np.nextafter(np.float32(1 + 1e-5), np.float32(0)))
    assert pos([[0, 0, below, 1], [0, 0, 1, 1]], size=(1, 1))[0, 2] == 1.0
    with pytest.raises(ValueError, match="outside"):
        pos([[0, 0, float(np.float32(1 + 1e-5)), 1], [0, 0, 1, 1]], size=(1, 1))
    with pytest.raises(ValueError, match="outside"):
        pos([[-float(np.float32(1e-5)), 0, 1, 1], [0, 0, 1, 1]], size=(1, 1))
    assert processor.box_tolerance == 1e-5 and processor.clamp_boxes is False
