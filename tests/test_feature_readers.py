"""HDF5 readers on files written here with the original VL-T5 / LXMERT and VL-Adapter layouts."""

import h5py
import numpy as np
import pytest
import torch
from conftest import tiny_config_kwargs

from vl_joint_encoder import JointEncoderConfig, JointEncoderModel, JointEncoderProcessor
from vl_joint_encoder.data.feature_stores import CLIPGridFeatures, FasterRCNNFeatures, open_feature_file
from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer


def write_vl_t5_file(path, images):
    """VL-T5 `*_obj36.h5`: group per image id with features, boxes (pixels), img_h, img_w (as its extraction does)."""
    with h5py.File(path, "w") as handle:
        for image_id, (feats, boxes, height, width) in images.items():
            group = handle.create_group(image_id)
            group["features"] = feats
            group["boxes"] = boxes
            group["img_h"] = height
            group["img_w"] = width


def test_faster_rcnn_reader_normalises_and_clamps_by_hand(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(36, 2048)).astype(np.float32)
    boxes = np.tile(np.array([[64.0, 48.0, 320.0, 240.0]], dtype=np.float32), (36, 1))
    boxes[1] = [-1.0, 0.0, 640.5, 480.0]  # overshoots by a pixel: beyond the originals' tolerance
    write_vl_t5_file(tmp_path / "train_obj36.h5", {"COCO_1": (feats, boxes, 480, 640)})
    with pytest.raises(ValueError, match=r"train_obj36.h5: COCO_1/boxes: box 1 \(-1.0, 0.0, 640.5, 480.0\)"):
        open_feature_file(tmp_path / "train_obj36.h5", feat_dim=2048)["COCO_1"]  # as the original asserts
    reader = open_feature_file(tmp_path / "train_obj36.h5", feat_dim=2048, clamp_boxes=True)  # clipped on request
    assert isinstance(reader, FasterRCNNFeatures) and len(reader) == 1 and "COCO_1" in reader
    item = reader["COCO_1"]
    np.testing.assert_array_equal(item["visual_feats"], feats)
    np.testing.assert_allclose(item["visual_pos"][0], [0.1, 0.1, 0.5, 0.5], atol=1e-7)  # 64/640, 48/480, ...
    np.testing.assert_allclose(item["visual_pos"][1], [0.0, 0.0, 1.0, 1.0], atol=0)
    # into the processor and the model
    tokenizer = train_vl_t5_tokenizer(["what is this"] * 10, vocab_size=30)
    processor = JointEncoderProcessor(tokenizer=tokenizer, feat_dim=2048)
    batch = processor(text=["what is this"], visual_feats=[item["visual_feats"]], boxes=[item["visual_pos"]])
    assert torch.equal(batch["visual_pos"][0], torch.from_numpy(item["visual_pos"]))
    model = JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer), feat_dim=2048)))
    assert model.eval()(**batch).last_hidden_state.shape[1] == batch["input_ids"].shape[1] + 36


def test_clip_grid_reader_zero_boxes(tmp_path):
    feats = np.random.default_rng(1).normal(size=(49, 64)).astype(np.float32)
    with h5py.File(tmp_path / "clip_RN101.h5", "w") as handle:
        handle.create_group("123")["features"] = feats
    reader = open_feature_file(tmp_path / "clip_RN101.h5")
    assert isinstance(reader, CLIPGridFeatures)
    item = reader["123"]
    np.testing.assert_array_equal(item["visual_feats"], feats)
    assert item["visual_pos"].shape == (49, 4) and not item["visual_pos"].any()
    with pytest.raises(KeyError, match="'999' is not in"):
        reader["999"]
    with pytest.raises(ValueError, match="feat_dim=2048"):
        CLIPGridFeatures(tmp_path / "clip_RN101.h5", feat_dim=2048)["123"]


def test_bad_feature_files(tmp_path):
    good = (np.ones((2, 8), np.float32), np.array([[0, 0, 10, 10], [5, 5, 20, 20]], np.float32), 20, 20)
    with pytest.raises(ValueError, match="does not exist"):
        FasterRCNNFeatures(tmp_path / "missing.h5")
    (tmp_path / "not.h5").write_bytes(b"this is not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        FasterRCNNFeatures(tmp_path / "not.h5")
    with h5py.File(tmp_path / "nobox.h5", "w") as handle:
        handle.create_group("a")["features"] = good[0]
    with pytest.raises(ValueError, match=r"lacks \['boxes', 'img_h', 'img_w'\]"):
        FasterRCNNFeatures(tmp_path / "nobox.h5")
    with h5py.File(tmp_path / "flat.h5", "w") as handle:
        handle["features"] = good[0]
    with pytest.raises(ValueError, match="dataset, not a group"):
        CLIPGridFeatures(tmp_path / "flat.h5")
    nan = good[0].copy()
    nan[1, 3] = np.nan
    write_vl_t5_file(tmp_path / "nan.h5", {"a": (nan, *good[1:])})
    with pytest.raises(ValueError, match="NaN"):
        FasterRCNNFeatures(tmp_path / "nan.h5", n_boxes=2)["a"]
    write_vl_t5_file(tmp_path / "swapped.h5", {"a": (good[0], np.array([[0, 0, 30, 10]] * 2, np.float32), 30, 10)})
    with pytest.raises(ValueError, match="outside the image"):  # boxes of a 30 x 10 image, img_h/img_w swapped
        FasterRCNNFeatures(tmp_path / "swapped.h5", n_boxes=None)["a"]
    write_vl_t5_file(tmp_path / "count.h5", {"a": (good[0], good[1][:1], 20, 20)})
    with pytest.raises(ValueError, match="expected \\(2, 4\\)"):
        FasterRCNNFeatures(tmp_path / "count.h5", n_boxes=None)["a"]
    with pytest.raises(ValueError, match=r"a/features has 2 boxes but the original loaders read exactly n_boxes=36"):
        FasterRCNNFeatures(tmp_path / "count.h5")["a"]


def test_missing_h5py_is_a_clear_error(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match="pip install h5py"):
        CLIPGridFeatures(tmp_path / "x.h5")
