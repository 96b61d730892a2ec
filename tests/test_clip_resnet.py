"""The CLIP ModifiedResNet tower (vl_joint_encoder/clip_resnet.py) against an independent functional forward of
openai/CLIP's code (tests/reference_clip_resnet.py) with random weights, its strict OpenAI-layout loading, saving as
remote code, and the PIL + numpy preprocessing (OpenAI's `_transform` and VL-Adapter's squash)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from reference_clip_resnet import random_openai_visual_state_dict, reference_forward

from vl_joint_encoder.clip_resnet import (
    CLIP_RESNET_PRESETS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CLIPResNetVisionConfig,
    CLIPResNetVisionModel,
    center_crop,
    clip_preprocess,
    config_from_openai_state_dict,
    convert_timm_state_dict,
    from_openai_state_dict,
    load_openai_state_dict,
    pixel_values_for,
    shortest_edge_size,
    vl_adapter_downsample,
    vl_adapter_preprocess,
)


TINY = dict(layers=(1, 2, 1, 1), width=8, image_size=64, output_dim=16)


def _tokens(feature_map):
    return feature_map.flatten(2).transpose(1, 2)


def _check_against_reference(sd, pixel_values):
    model = from_openai_state_dict(sd)
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True)
        grid, pooled, maps = reference_forward(sd, pixel_values)
    torch.testing.assert_close(out.last_hidden_state, _tokens(grid), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, pooled, rtol=1e-5, atol=1e-5)
    assert len(out.hidden_states) == 5
    for ours, theirs in zip(out.hidden_states, maps):
        torch.testing.assert_close(ours, _tokens(theirs), rtol=1e-5, atol=1e-5)
    assert out.hidden_states[-1] is out.last_hidden_state or torch.equal(out.hidden_states[-1], out.last_hidden_state)
    return model, out, grid, pooled


def test_rn50_equals_reference_random_weights():
    sd = random_openai_visual_state_dict(**CLIP_RESNET_PRESETS["RN50"], seed=1)
    pixel_values = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    model, out, grid, pooled = _check_against_reference(sd, pixel_values)
    assert out.last_hidden_state.shape == (2, 49, 2048)
    assert out.pooler_output.shape == (2, 1024)
    assert model.config.heads == 32 and model.config.hidden_size == 2048 and model.config.grid_size == 7
    # activations are O(1..100): the 1e-5 comparison is not vacuous
    assert 1.0 < out.last_hidden_state.abs().max() < 1e3 and 0.1 < out.pooler_output.abs().max() < 1e3
    # row-major tokens: token r * 7 + c is grid cell (r, c), VL-Adapter's permute(1, 2, 0).reshape(49, -1)
    torch.testing.assert_close(out.last_hidden_state[1], grid[1].permute(1, 2, 0).reshape(49, -1), rtol=0, atol=0)


def test_tiny_equals_reference_and_batch_independent():
    sd = random_openai_visual_state_dict(**TINY, seed=3)
    pixel_values = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    model, out, _, _ = _check_against_reference(sd, pixel_values)
    assert out.last_hidden_state.shape == (3, 4, 256) and out.pooler_output.shape == (3, 16)
    with torch.no_grad():
        single = model(pixel_values[1:2])
    torch.testing.assert_close(single.pooler_output[0], out.pooler_output[1], rtol=1e-5, atol=1e-5)
    as_tuple = model(pixel_values, return_dict=False)
    assert len(as_tuple) == 2 and torch.equal(as_tuple[0], out.last_hidden_state)


def test_other_resolution_needs_interpolation():
    sd = random_openai_visual_state_dict(**TINY, seed=5)
    model = from_openai_state_dict(sd)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(torch.randn(1, 3, 96, 96))
    out = model(torch.randn(1, 3, 96, 96), interpolate_pos_encoding=True)
    assert out.last_hidden_state.shape == (1, 9, 256) and out.pooler_output.shape == (1, 16)
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(torch.randn(3, 64, 64))


@pytest.mark.parametrize("name", ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64"])
def test_presets_and_config_inference(name):
    config = CLIPResNetVisionConfig.from_preset(name)
    assert config.heads == config.width * 32 // 64
    with torch.device("meta"):  # shapes only, no memory
        model = CLIPResNetVisionModel(config)
    state_dict = {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
    inferred = config_from_openai_state_dict(state_dict)
    for field in ("layers", "width", "image_size", "output_dim", "heads"):
        assert getattr(inferred, field) == getattr(config, field), field
    expected = {"RN50": (2048, 7), "RN101": (2048, 7), "RN50x4": (2560, 9), "RN50x16": (3072, 12), "RN50x64": (4096, 14)}
    assert (config.hidden_size, config.grid_size) == expected[name]


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        CLIPResNetVisionConfig(image_size=100)
    with pytest.raises(ValueError, match="4 positive"):
        CLIPResNetVisionConfig(layers=(3, 4, 6))
    with pytest.raises(ValueError, match="unknown CLIP ResNet preset"):
        CLIPResNetVisionConfig.from_preset("RN18")


def test_loading_is_strict_and_clear():
    sd = random_openai_visual_state_dict(**TINY, seed=6)
    model = CLIPResNetVisionModel(CLIPResNetVisionConfig(**TINY))
    report = load_openai_state_dict(model, sd)
    assert report["ignored_outside_prefix"] == 3  # logit_scale, text_projection, token_embedding
    assert report["loaded"] == len(model.visual.state_dict())

    missing = dict(sd)
    del missing["visual.layer2.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"missing 1 key\(s\): visual\.layer2\.1\.bn2\.running_var"):
        load_openai_state_dict(model, missing)

    unexpected = dict(sd)
    unexpected["visual.layer5.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected 1 key\(s\): visual\.layer5\.0\.conv1\.weight"):
        load_openai_state_dict(model, unexpected)

    wrong_shape = dict(sd)
    wrong_shape["visual.attnpool.c_proj.weight"] = torch.zeros(32, 256)
    with pytest.raises(ValueError, match=r"shape mismatch.*attnpool\.c_proj\.weight: checkpoint \(32, 256\)"):
        load_openai_state_dict(model, wrong_shape)

    other_size = random_openai_visual_state_dict(layers=(1, 1, 1, 1), width=8, image_size=64, output_dim=16)
    with pytest.raises(ValueError, match="config_from_openai_state_dict"):
        load_openai_state_dict(model, other_size)

    with pytest.raises(ValueError, match="no key starts with 'visual.'"):
        load_openai_state_dict(model, {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")})
    vit = {"visual.conv1.weight": torch.zeros(8, 3, 4, 4), "visual.class_embedding": torch.zeros(8)}
    with pytest.raises(ValueError, match="ViT"):
        load_openai_state_dict(model, vit)


def test_loading_bare_prefix_fp16_and_missing_batch_counters():
    sd = random_openai_visual_state_dict(**TINY, seed=7, with_text=False)
    bare = {k[len("visual."):]: v.half() if v.is_floating_point() else v for k, v in sd.items()
            if not k.endswith("num_batches_tracked")}
    model = CLIPResNetVisionModel(CLIPResNetVisionConfig(**TINY))
    report = load_openai_state_dict(model, bare, prefix="")
    assert report["source_dtypes"] == ["float16"] and report["missing_batch_counters"] > 0
    assert model.visual.conv1.weight.dtype == torch.float32
    torch.testing.assert_close(model.visual.conv1.weight, bare["conv1.weight"].float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        load_openai_state_dict(model, bare, prefix="", allow_missing_batch_counters=False)


def test_save_pretrained_and_remote_code_round_trip(tmp_path):
    from transformers import AutoModel

    sd = random_openai_visual_state_dict(**TINY, seed=8)
    model = from_openai_state_dict(sd)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "clip_resnet.py").is_file()  # ships as remote code
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values).pooler_output
        again = CLIPResNetVisionModel.from_pretrained(tmp_path)(pixel_values).pooler_output
        remote = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
        assert type(remote).__name__ == "CLIPResNetVisionModel" and type(remote) is not CLIPResNetVisionModel
        from_remote = remote(pixel_values).pooler_output
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    torch.testing.assert_close(from_remote, expected, rtol=0, atol=0)


def test_timm_key_conversion():
    t = torch.zeros(1)
    converted = convert_timm_state_dict(
        {
            "stem.conv1.conv.weight": t,
            "stem.conv3.bn.running_var": t,
            "stages.0.0.conv2_kxk.bn.weight": t,
            "stages.2.5.conv3_1x1.conv.weight": t,
            "stages.1.0.shortcut.conv.conv.weight": t,
            "stages.1.0.shortcut.conv.bn.bias": t,
            "head.pos_embed": t,
            "head.q.weight": t,
            "head.proj.bias": t,
        }
    )
    assert sorted(converted) == sorted(
        [
            "visual.conv1.weight",
            "visual.bn3.running_var",
            "visual.layer1.0.bn2.weight",
            "visual.layer3.5.conv3.weight",
            "visual.layer2.0.downsample.0.weight",
            "visual.layer2.0.downsample.1.bias",
            "visual.attnpool.positional_embedding",
            "visual.attnpool.q_proj.weight",
            "visual.attnpool.c_proj.bias",
        ]
    )
    with pytest.raises(ValueError, match="head.qkv.weight"):
        convert_timm_state_dict({"head.qkv.weight": t})


def test_vl_adapter_downsample_is_a_2x2_stride_1_max_pool():
    tokens = torch.randn(2, 49, 5)
    pooled = vl_adapter_downsample(tokens)
    grid = tokens.transpose(1, 2).reshape(2, 5, 7, 7)
    expected = F.max_pool2d(grid, kernel_size=2, stride=1).reshape(2, 5, 36).transpose(1, 2)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="square"):
        vl_adapter_downsample(torch.randn(1, 50, 5))


# ---------------------------------------------------------------------------------------------- preprocessing


def _photos():
    skimage_data = pytest.importorskip("skimage.data")
    return {"astronaut": skimage_data.astronaut(), "chelsea": skimage_data.chelsea(), "coffee": skimage_data.coffee(),
            "camera": skimage_data.camera()}


def _hand_normalise(rgb_uint8):
    """ToTensor + Normalize written out per element in float32."""
    x = rgb_uint8.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    mean = np.array(OPENAI_CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(OPENAI_CLIP_STD, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def test_preprocessing_of_real_photos_shapes_and_ranges():
    low = (0 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    high = (1 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    for name, array in _photos().items():
        for function in (clip_preprocess, vl_adapter_preprocess):
            out = function(array)
            assert out.shape == (3, 224, 224) and out.dtype == np.float32, (name, function.__name__)
            assert np.all(out >= low[:, None, None].astype(np.float32) - 1e-6)
            assert np.all(out <= high[:, None, None].astype(np.float32) + 1e-6)
        assert clip_preprocess(array, 288).shape == (3, 288, 288)
    batch = pixel_values_for([Image.fromarray(a) for a in _photos().values()], mode="vl_adapter")
    assert batch.shape == (4, 3, 224, 224) and batch.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown preprocessing mode"):
        pixel_values_for(_photos()["astronaut"], mode="squash")


def test_clip_preprocess_by_hand_on_tiny_images():
    rng = np.random.default_rng(0)
    # 4 x 3 (w x h): the short edge is already 3 -> no resampling; CenterCrop(3): left = round(0.5) = 0 (Python
    # rounds half to even, as torchvision's int(round(...)) does)
    image = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    np.testing.assert_array_equal(clip_preprocess(image, 3), _hand_normalise(image[:, 0:3]))
    # 5 x 3: left = round(1.0) = 1
    image = rng.integers(0, 256, size=(3, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(clip_preprocess(image, 3), _hand_normalise(image[:, 1:4]))
    # 3 x 6 (portrait): top = round(1.5) = 2
    image = rng.integers(0, 256, size=(6, 3, 3), dtype=np.uint8)
    np.testing.assert_array_equal(clip_preprocess(image, 3), _hand_normalise(image[2:5, :]))
    # a flat colour survives bicubic resampling exactly: every pixel is the hand-normalised colour
    flat = np.full((7, 11, 3), (200, 30, 91), dtype=np.uint8)
    expected = _hand_normalise(flat[:1, :1])
    for function in (clip_preprocess, vl_adapter_preprocess):
        out = function(flat, 4)
        assert out.shape == (3, 4, 4)
        np.testing.assert_array_equal(out, np.broadcast_to(expected, (3, 4, 4)))


def test_resize_and_crop_geometry_follows_torchvision():
    # torchvision _compute_resized_output_size: long side int(size * long / short), truncated
    assert shortest_edge_size(451, 300, 224) == (336, 224)  # 224 * 451 / 300 = 336.75
    assert shortest_edge_size(300, 451, 224) == (224, 336)
    assert shortest_edge_size(640, 427, 224) == (335, 224)  # 335.74...
    assert shortest_edge_size(512, 512, 224) == (224, 224)
    # padding when smaller (torchvision pads left/top with the floor half)
    small = Image.fromarray(np.full((2, 3, 3), 255, dtype=np.uint8))
    padded = np.asarray(center_crop(small, 5))
    assert padded.shape == (5, 5, 3)
    assert padded[1:3, 1:4].min() == 255 and padded.sum() == 255 * 2 * 3 * 3


def test_vl_adapter_preprocess_squashes_and_converts_first():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8))
    expected = _hand_normalise(np.asarray(image.resize((8, 8), Image.Resampling.BICUBIC)))
    np.testing.assert_array_equal(vl_adapter_preprocess(image, 8), expected)
    # grey / palette images are converted to RGB before resizing, as coco_CLIP.py's Image.open(...).convert("RGB")
    grey = image.convert("L")
    np.testing.assert_array_equal(vl_adapter_preprocess(grey, 8), vl_adapter_preprocess(grey.convert("RGB"), 8))
    palette = image.convert("P")
    np.testing.assert_array_equal(vl_adapter_preprocess(palette, 8), vl_adapter_preprocess(palette.convert("RGB"), 8))
    # OpenAI's order (resize, crop, then RGB) differs on a palette image: Pillow resizes "P" with NEAREST
    assert not np.array_equal(clip_preprocess(palette, 8), clip_preprocess(palette.convert("RGB"), 8))


def test_end_to_end_photo_through_the_tower():
    sd = random_openai_visual_state_dict(**{**TINY, "image_size": 224}, seed=9)
    model = from_openai_state_dict(sd)
    pixel_values = pixel_values_for(list(_photos().values())[:2], mode="vl_adapter")
    with torch.no_grad():
        out = model(pixel_values)
        grid, pooled, _ = reference_forward(sd, pixel_values)
    assert out.last_hidden_state.shape == (2, 49, 256)
    torch.testing.assert_close(out.pooler_output, pooled, rtol=1e-5, atol=1e-5)
    assert math.isfinite(out.last_hidden_state.abs().max().item())
