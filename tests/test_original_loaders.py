"""The package's inputs equal the original loaders' bit for bit, on files written in the originals' own layouts
(tests/original_loaders.py transcribes the writers and loaders of j-min/VL-T5 and ylsung/VL_adapter): VL-T5's
Faster R-CNN HDF5, LXMERT's TSV (through the originals' tsv_to_h5.py), VL-Adapter's folder of one CLIP file per image
and the single file with groups, NLVR2's two images, task prefixes, a literal `<pad>` in a question, the box
tolerance and the box count."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from original_loaders import (
    coco_clip_write,
    tsv_to_h5,
    two_image_sequence,
    vl_adapter_nlvr_clip_item,
    vl_adapter_vqa_clip_batch,
    vl_t5_nlvr_item,
    vl_t5_vqa_batch,
    write_lxmert_tsv,
)
from vl_bart_fixtures import build_tiny_bart_tokenizer

from vl_joint_encoder import JointEncoderProcessor
from vl_joint_encoder.data.feature_stores import (
    CLIPGridFeatures,
    FasterRCNNFeatures,
    LXMERTTSVFeatures,
    PerImageCLIPFeatures,
    open_feature_file,
    open_feature_store,
)
from vl_joint_encoder.data.feature_stores import tsv_to_h5 as package_tsv_to_h5
from vl_joint_encoder.data.inputs import JointEncoderInputBuilder
from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer


QUESTIONS = ["what color is the bus", "how many <pad> dogs are there", "is this a kitchen or a living room ok"]
IMAGE_IDS = ["COCO_val2014_000000000042", "COCO_val2014_000000000073", "COCO_val2014_000000000074"]


@pytest.fixture(scope="module", params=["t5", "bart"])
def tokenizer(request):
    if request.param == "bart":
        return build_tiny_bart_tokenizer()
    return train_vl_t5_tokenizer([q.replace("<pad>", "") for q in QUESTIONS] * 20, vocab_size=60)


def faster_rcnn_rows(seed=0, n=36, images=IMAGE_IDS):
    """LXMERT TSV rows with pixel boxes as detectors give them: some touch the border, one overshoots within the
    originals' tolerance (1 + 5e-6 of the width), sizes vary."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, image_id in enumerate(images):
        width, height = 640 - 37 * k, 480 + 11 * k
        xy1 = rng.uniform(0, 0.6, size=(n, 2)) * [width, height]
        xy2 = xy1 + rng.uniform(0.05, 0.4, size=(n, 2)) * [width, height]
        boxes = np.concatenate([xy1, np.minimum(xy2, [width, height])], axis=1).astype(np.float32)
        boxes[0] = [0, 0, width, height]
        boxes[1, 2] = np.float32(width * (1 + 5e-6))  # x2 just past the border: accepted, then clamped to 1
        rows.append(dict(
            img_id=image_id, img_h=height, img_w=width, boxes=boxes,
            features=rng.normal(size=(n, 2048)).astype(np.float32) * rng.uniform(0, 3),
            objects_id=rng.integers(0, 1600, n), objects_conf=rng.uniform(size=n).astype(np.float32),
            attrs_id=rng.integers(0, 400, n), attrs_conf=rng.uniform(size=n).astype(np.float32),
        ))
    return rows


def assert_same_batch(ours, original, num_visual):
    """Our batch (processor / builder) against the original collate's, bit for bit."""
    assert torch.equal(ours["input_ids"], original["input_ids"])
    assert torch.equal(ours["attention_mask"], original["attention_mask"])  # = input_ids != pad, <pad> included
    assert ours["visual_feats"].dtype == original["vis_feats"].dtype == torch.float32
    assert torch.equal(ours["visual_feats"], original["vis_feats"])
    assert torch.equal(ours["visual_pos"], original["boxes"])
    batch = len(original["input_ids"])
    assert torch.equal(ours["visual_attention_mask"], torch.ones(batch, num_visual, dtype=torch.long))
    assert torch.equal(ours["image_order_ids"], torch.zeros(batch, num_visual, dtype=torch.long))
    assert torch.equal(ours["object_order_ids"], torch.arange(num_visual).expand(batch, -1))


def builder_batch(tokenizer, store, prefix, max_length=20):
    processor = JointEncoderProcessor(tokenizer=tokenizer, feat_dim=2048, text_prefix=prefix)
    return JointEncoderInputBuilder(processor, max_length=max_length, feature_store=store)(QUESTIONS, IMAGE_IDS)


# --------------------------------------------------------------------------------- VL-T5 / LXMERT Faster R-CNN
def test_vqa_on_tsv_converted_by_tsv_to_h5_and_on_the_tsv_itself(tmp_path, tokenizer):
    write_lxmert_tsv(tmp_path / "val2014_obj36.tsv", faster_rcnn_rows())
    tsv_to_h5(tmp_path / "val2014_obj36.tsv", tmp_path / "val2014_obj36.h5")  # the originals' own conversion
    original = vl_t5_vqa_batch(tmp_path / "val2014_obj36.h5", list(zip(IMAGE_IDS, QUESTIONS)), tokenizer)
    row = original["input_ids"][1].tolist()
    assert tokenizer.pad_token_id in row[: row.index(tokenizer.eos_token_id)]  # the literal <pad> of the question
    assert original["attention_mask"][1, row.index(tokenizer.pad_token_id)] == 0
    assert original["boxes"][0, 1, 2] == 1.0  # the overshooting box was accepted and clamped

    h5_store = open_feature_store(tmp_path / "val2014_obj36.h5")
    assert isinstance(h5_store, FasterRCNNFeatures)
    assert_same_batch(builder_batch(tokenizer, h5_store, "vqa: "), original, 36)
    tsv_store = open_feature_store(tmp_path / "val2014_obj36.tsv")
    assert isinstance(tsv_store, LXMERTTSVFeatures) and tsv_store.keys() == IMAGE_IDS
    assert_same_batch(builder_batch(tokenizer, tsv_store, "vqa: "), original, 36)
    # the processor alone, with the store's entries, gives the same too
    processor = JointEncoderProcessor(tokenizer=tokenizer, feat_dim=2048, text_prefix="vqa: ")
    entries = [h5_store[i] for i in IMAGE_IDS]
    direct = processor(text=QUESTIONS, visual_feats=[e["visual_feats"] for e in entries],
                       boxes=[e["visual_pos"] for e in entries], max_length=20)
    assert_same_batch(direct, original, 36)


def test_package_tsv_to_h5_writes_the_originals_file(tmp_path):
    rows = faster_rcnn_rows(seed=1)
    write_lxmert_tsv(tmp_path / "train.tsv", rows)
    tsv_to_h5(tmp_path / "train.tsv", tmp_path / "original.h5")
    assert package_tsv_to_h5(tmp_path / "train.tsv", tmp_path / "ours.h5") == 3
    with h5py.File(tmp_path / "original.h5") as a, h5py.File(tmp_path / "ours.h5") as b:
        assert list(a) == list(b) == IMAGE_IDS
        for image_id in IMAGE_IDS:
            assert sorted(a[image_id]) == sorted(b[image_id])
            for name in a[image_id]:
                x, y = a[image_id][name][()], b[image_id][name][()]
                assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y), (image_id, name)


def test_nlvr2_two_images_from_hdf5(tmp_path, tokenizer):
    write_lxmert_tsv(tmp_path / "valid.tsv", faster_rcnn_rows(seed=2))
    tsv_to_h5(tmp_path / "valid.tsv", tmp_path / "valid_obj36.h5")
    with h5py.File(tmp_path / "valid_obj36.h5") as f:
        feats, boxes = vl_t5_nlvr_item(f, IMAGE_IDS[0], IMAGE_IDS[2])
    vis_feats, vis_pos, img_order_ids, obj_order_ids = two_image_sequence(feats[None], boxes[None])
    store = open_feature_store(tmp_path / "valid_obj36.h5")
    pair = [store[IMAGE_IDS[0]], store[IMAGE_IDS[2]]]
    ours = JointEncoderProcessor(tokenizer=tokenizer, feat_dim=2048, n_images=2)(
        text=["nlvr: the left image has two dogs"], visual_feats=[[e["visual_feats"] for e in pair]],
        boxes=[[e["visual_pos"] for e in pair]],
    )
    assert torch.equal(ours["visual_feats"], vis_feats) and torch.equal(ours["visual_pos"], vis_pos)
    assert torch.equal(ours["image_order_ids"], img_order_ids)
    assert torch.equal(ours["object_order_ids"], obj_order_ids)


def test_box_outside_the_tolerance_and_box_count_as_the_original(tmp_path, tokenizer):
    rows = faster_rcnn_rows(seed=3)
    rows[1]["boxes"][7] = [-2.0, 10.0, 100.0, 90.0]  # 2 pixels left of the image
    write_lxmert_tsv(tmp_path / "bad.tsv", rows)
    tsv_to_h5(tmp_path / "bad.tsv", tmp_path / "bad.h5")
    with pytest.raises(AssertionError):  # the original stops on np.testing.assert_array_less
        vl_t5_vqa_batch(tmp_path / "bad.h5", list(zip(IMAGE_IDS, QUESTIONS)), tokenizer)
    for path in (tmp_path / "bad.h5", tmp_path / "bad.tsv"):
        store = open_feature_store(path)
        store[IMAGE_IDS[0]]  # the other images read fine
        with pytest.raises(ValueError, match=rf"{IMAGE_IDS[1]}/boxes: box 7 \(-2.0, 10.0, 100.0, 90.0\)"):
            store[IMAGE_IDS[1]]
        clamped = open_feature_store(path, clamp_boxes=True)[IMAGE_IDS[1]]["visual_pos"]  # on request: clipped
        width, height = rows[1]["img_w"], rows[1]["img_h"]
        expected = np.clip(rows[1]["boxes"] / np.array([width, height, width, height], np.float32), 0, 1)
        np.testing.assert_array_equal(clamped, expected.astype(np.float32))

    rows = faster_rcnn_rows(seed=4, n=40)  # a file with 40 boxes per image
    write_lxmert_tsv(tmp_path / "obj40.tsv", rows)
    tsv_to_h5(tmp_path / "obj40.tsv", tmp_path / "obj40.h5")
    with pytest.raises(TypeError, match="Can't broadcast"):  # read_direct into (36, 2048)
        vl_t5_vqa_batch(tmp_path / "obj40.h5", list(zip(IMAGE_IDS, QUESTIONS)), tokenizer)
    with pytest.raises(ValueError, match="features has 40 boxes but the original loaders read exactly n_boxes=36"):
        open_feature_store(tmp_path / "obj40.h5")[IMAGE_IDS[0]]
    original = vl_t5_vqa_batch(tmp_path / "obj40.h5", list(zip(IMAGE_IDS, QUESTIONS)), tokenizer, n_boxes=40)
    for n_boxes in (40, None):
        store = open_feature_store(tmp_path / "obj40.h5", n_boxes=n_boxes)
        assert_same_batch(builder_batch(tokenizer, store, "vqa: "), original, 40)


# ----------------------------------------------------------------------------------------- VL-Adapter CLIP
def clip_grids(seed=5, images=IMAGE_IDS):
    generator = torch.Generator().manual_seed(seed)
    # coco_CLIP.py computes in fp16 on the GPU: post-ReLU layer4 activations, non-negative, stored as float16
    return {i: (torch.randn(49, 2048, generator=generator).relu() * 3).half() for i in images}


def test_vl_adapter_per_image_folder_as_its_loader(tmp_path, tokenizer):
    folder = tmp_path / "COCO" / "features" / "data_clip_RN101_att"
    folder.mkdir(parents=True)
    grids = clip_grids()
    for image_id, grid in grids.items():
        coco_clip_write(str(folder), image_id, grid)
    with h5py.File(folder / f"{IMAGE_IDS[0]}.h5") as handle:  # the layout: group img_id, dataset features fp16
        assert list(handle) == [IMAGE_IDS[0]] and handle[IMAGE_IDS[0]]["features"].dtype == np.float16
    # single_adapter.sh (--use_tasks_prompts) feeds VQA questions as "vqa: {sent}" (multitask.py 1080)
    original = vl_adapter_vqa_clip_batch(Path(folder), list(zip(IMAGE_IDS, QUESTIONS)), tokenizer, prompt="vqa: ")
    store = open_feature_store(folder)
    assert isinstance(store, PerImageCLIPFeatures) and store.keys() == sorted(IMAGE_IDS) and IMAGE_IDS[1] in store
    assert isinstance(open_feature_file(folder), PerImageCLIPFeatures)  # was "does not exist"
    assert_same_batch(builder_batch(tokenizer, store, "vqa: "), original, 49)
    # multiple_adapters.sh: no prompt
    original = vl_adapter_vqa_clip_batch(Path(folder), list(zip(IMAGE_IDS, QUESTIONS)), tokenizer, prompt="")
    assert_same_batch(builder_batch(tokenizer, store, None), original, 49)
    # the same grids in one file with a group per image read the same
    with h5py.File(tmp_path / "clip.h5", "w") as handle:
        for image_id, grid in grids.items():
            handle.create_group(image_id)["features"] = grid.numpy()
    single = open_feature_store(tmp_path / "clip.h5")
    assert isinstance(single, CLIPGridFeatures)
    assert_same_batch(builder_batch(tokenizer, single, None), original, 49)


def test_vl_adapter_nlvr2_two_grids(tmp_path, tokenizer):
    folder = tmp_path / "data_clip_RN101_att"
    folder.mkdir()
    grids = clip_grids(seed=6)
    for image_id, grid in grids.items():
        coco_clip_write(str(folder), image_id, grid)
    feats, boxes = vl_adapter_nlvr_clip_item(folder, IMAGE_IDS[2], IMAGE_IDS[0])
    vis_feats, vis_pos, img_order_ids, obj_order_ids = two_image_sequence(feats[None], boxes[None])
    store = open_feature_store(folder)
    ours = JointEncoderProcessor(tokenizer=tokenizer, feat_dim=2048, n_images=2)(
        text=["there are two dogs"], visual_feats=[[store[IMAGE_IDS[2]]["visual_feats"], store[IMAGE_IDS[0]]["visual_feats"]]],
        boxes=[[store[IMAGE_IDS[2]]["visual_pos"], store[IMAGE_IDS[0]]["visual_pos"]]],
    )
    assert torch.equal(ours["visual_feats"], vis_feats) and torch.equal(ours["visual_pos"], vis_pos)
    assert torch.equal(ours["image_order_ids"], img_order_ids)
    assert torch.equal(ours["object_order_ids"], obj_order_ids)


def test_bad_per_image_folders_and_tsv_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without manifest.json and without .h5 files"):
        open_feature_store(tmp_path / "empty")
    (tmp_path / "wrong").mkdir()
    with h5py.File(tmp_path / "wrong" / "img1.h5", "w") as handle:
        handle.create_group("img2")["features"] = np.zeros((49, 8), np.float16)
    with pytest.raises(ValueError, match=r"img1.h5' has no group 'img1' \(it has \['img2'\]\)"):
        open_feature_store(tmp_path / "wrong")
    folder = tmp_path / "feats"
    folder.mkdir()
    coco_clip_write(str(folder), "a", torch.zeros(49, 8).half())
    store = PerImageCLIPFeatures(folder, feat_dim=8)
    with pytest.raises(KeyError, match="no b.h5"):
        store["b"]
    with pytest.raises(ValueError, match="feat_dim=2048"):
        PerImageCLIPFeatures(folder, feat_dim=2048)
    (tmp_path / "broken.tsv").write_text("img\t1\t2\n")
    with pytest.raises(ValueError, match="has 3 tab-separated fields, LXMERT's TSV has 10"):
        open_feature_store(tmp_path / "broken.tsv")
    rows = faster_rcnn_rows(seed=7, images=["x", "x"])
    write_lxmert_tsv(tmp_path / "twice.tsv", rows)
    with pytest.raises(ValueError, match="image id 'x' appears twice"):
        open_feature_store(tmp_path / "twice.tsv")
    with pytest.raises(ValueError, match="appears twice"):
        package_tsv_to_h5(tmp_path / "twice.tsv", tmp_path / "twice.h5")
    assert not (tmp_path / "twice.h5").exists() and not [p for p in tmp_path.iterdir() if "twice.h5" in p.name]
