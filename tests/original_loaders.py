"""The original projects' feature writers and data loaders, transcribed line for line (only the parts that build the
encoder's inputs), to test the package's readers against on files in exactly their layouts. Nothing here imports
vl_joint_encoder.

Sources (line numbers at these commits):
  [T] j-min/VL-T5 a07d779: VL-T5/src/vqa_data.py (VQAFineTuneDataset.__getitem__ 132-186, collate_fn 273-350),
      VL-T5/src/nlvr_data.py (__getitem__ 105-160), VL-T5/src/nlvr_model.py (two images -> one sequence),
      feature_extraction/tsv_to_h5.py (load_obj_tsv and __main__), the encoders' mask `input_ids.ne(pad)`
  [A] ylsung/VL_adapter 545fcbb: feature_extraction/coco_CLIP.py (writer, 176-181), VL-T5/src/vqa_clip_data.py
      (__getitem__ 150-201, collate_fn 290-330), VL-T5/src/nlvr_clip_data.py (__getitem__ 110-146, collate 185-205),
      VL-T5/src/nlvr_model.py (VLBartNLVR.train_step 138-170), VL-T5/src/multitask.py 1079-1096 (prompts)
  LXMERT's TSV writer: the bottom-up-attention `generate_tsv.py` convention (csv.DictWriter, tab, base64 of the raw
      arrays) that tsv_to_h5.py's FIELDNAMES and decode_config read back.

Differences on purpose: the originals' Dataset/collate classes are flattened into functions over lists of items; the
originals' numpy 1.x compared float32 boxes with the Python float tolerance in float32 (value-based casting), numpy
2 compares in float64: the two differ only on the box value -float32(1e-5), which the tests avoid here (the package
follows numpy 1.x; tests/test_processor.py checks that boundary by hand).
"""

from __future__ import annotations

import base64
import csv
import os
import sys

import h5py
import numpy as np
import torch


FIELDNAMES = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes",
              "boxes", "features"]


# --------------------------------------------------------------------------------------------------- writers
def write_lxmert_tsv(path, rows):
    """rows: dicts with img_id, img_h, img_w, and arrays objects_id (N,) int64, objects_conf (N,) float32,
    attrs_id, attrs_conf, boxes (N, 4) float32, features (N, 2048) float32; written as LXMERT's TSV (no header)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, delimiter="\t", fieldnames=FIELDNAMES)
        for row in rows:
            writer.writerow({
                "img_id": row["img_id"], "img_h": row["img_h"], "img_w": row["img_w"], "num_boxes": len(row["boxes"]),
                **{key: base64.b64encode(np.ascontiguousarray(row[key]).tobytes()).decode("ascii")
                   for key in ("objects_id", "objects_conf", "attrs_id", "attrs_conf", "boxes", "features")},
            })


def coco_clip_write(folder, img_id, output):
    """[A] coco_CLIP.py 176-181: one file per image, group img_id, dataset features = the (49, C) fp16 tensor."""
    output_fname = os.path.join(folder, f"{img_id}.h5")
    with h5py.File(output_fname, "w") as f:
        grp = f.create_group(img_id)
        grp["features"] = output.cpu()


# ------------------------------------------------------------------------------------------------ tsv_to_h5.py
def load_obj_tsv(fname, topk=None):
    """[T] feature_extraction/tsv_to_h5.py load_obj_tsv (timing prints dropped)."""
    csv.field_size_limit(sys.maxsize)
    data = []
    with open(fname) as f:
        reader = csv.DictReader(f, FIELDNAMES, delimiter="\t")
        for item in reader:
            for key in ["img_h", "img_w", "num_boxes"]:
                item[key] = int(item[key])
            boxes = item["num_boxes"]
            decode_config = [
                ("objects_id", (boxes,), np.int64),
                ("objects_conf", (boxes,), np.float32),
                ("attrs_id", (boxes,), np.int64),
                ("attrs_conf", (boxes,), np.float32),
                ("boxes", (boxes, 4), np.float32),
                ("features", (boxes, -1), np.float32),
            ]
            for key, shape, dtype in decode_config:
                item[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dtype)
                item[key] = item[key].reshape(shape)
                item[key].setflags(write=False)
            data.append(item)
            if topk is not None and len(data) == topk:
                break
    return data


def tsv_to_h5(tsv_path, h5_path):
    """[T] feature_extraction/tsv_to_h5.py __main__."""
    data = load_obj_tsv(tsv_path)
    with h5py.File(h5_path, "w") as f:
        for datum in data:
            img_id = datum["img_id"]
            num_boxes = datum["num_boxes"]
            grp = f.create_group(img_id)
            grp["features"] = datum["features"].reshape(num_boxes, 2048)
            grp["obj_id"] = datum["objects_id"]
            grp["obj_conf"] = datum["objects_conf"]
            grp["attr_id"] = datum["attrs_id"]
            grp["attr_conf"] = datum["attrs_conf"]
            grp["boxes"] = datum["boxes"]
            grp["img_w"] = datum["img_w"]
            grp["img_h"] = datum["img_h"]


# ------------------------------------------------------------------------------------------------- VL-T5 VQA
def vl_t5_vqa_item(f, img_id, sent, tokenizer, n_boxes=36):
    """[T] vqa_data.py VQAFineTuneDataset.__getitem__, image and text parts."""
    out_dict = {}
    feats = np.zeros(shape=(n_boxes, 2048), dtype=np.float32)
    f[f"{img_id}/features"].read_direct(feats)
    feats = torch.from_numpy(feats)
    out_dict["vis_feats"] = feats
    img_h = f[f"{img_id}/img_h"][()]
    img_w = f[f"{img_id}/img_w"][()]
    boxes = f[f"{img_id}/boxes"][()]  # (x1, y1, x2, y2)
    boxes[:, (0, 2)] /= img_w
    boxes[:, (1, 3)] /= img_h
    np.testing.assert_array_less(boxes, 1 + 1e-5)
    np.testing.assert_array_less(-boxes, 0 + 1e-5)
    boxes = torch.from_numpy(boxes)
    boxes.clamp_(min=0.0, max=1.0)
    out_dict["boxes"] = boxes
    input_ids = tokenizer.encode(f"vqa: {sent}", max_length=20, truncation=True)
    out_dict["input_ids"] = torch.LongTensor(input_ids)
    out_dict["input_length"] = len(input_ids)
    return out_dict


def vl_t5_vqa_collate(batch, tokenizer):
    """[T] vqa_data.py collate_fn (vision and text parts), plus the encoder's mask input_ids != pad."""
    B = len(batch)
    S_W_L = max(entry["input_length"] for entry in batch)
    input_ids = torch.ones(B, S_W_L, dtype=torch.long) * tokenizer.pad_token_id
    V_L = len(batch[0]["boxes"])
    feat_dim = batch[0]["vis_feats"].shape[-1]
    boxes = torch.zeros(B, V_L, 4, dtype=torch.float)
    vis_feats = torch.zeros(B, V_L, feat_dim, dtype=torch.float)
    for i, entry in enumerate(batch):
        input_ids[i, : entry["input_length"]] = entry["input_ids"]
        boxes[i] += entry["boxes"]
        vis_feats[i] += entry["vis_feats"]
    return {"input_ids": input_ids, "attention_mask": input_ids.ne(tokenizer.pad_token_id).long(),
            "vis_feats": vis_feats, "boxes": boxes}


def vl_t5_vqa_batch(h5_path, items, tokenizer, n_boxes=36):
    """items: (img_id, question) pairs -> the batch VL-T5's VQA model feeds its encoder."""
    with h5py.File(h5_path, "r") as f:
        batch = [vl_t5_vqa_item(f, img_id, sent, tokenizer, n_boxes) for img_id, sent in items]
    return vl_t5_vqa_collate(batch, tokenizer)


# ------------------------------------------------------------------------------------------------ VL-T5 NLVR2
def vl_t5_nlvr_item(f, img0, img1, n_boxes=36):
    """[T] nlvr_data.py __getitem__ 118-150: both images' features and normalised boxes, stacked."""
    feats2 = []
    for img_id in (img0, img1):
        feats = np.zeros(shape=(n_boxes, 2048), dtype=np.float32)
        f[f"{img_id}/features"].read_direct(feats)
        feats2.append(feats)
    feats = torch.from_numpy(np.stack(feats2))  # [2, n_boxes, feat_dim]
    boxes2 = []
    for img_id in (img0, img1):
        img_h = f[f"{img_id}/img_h"][()]
        img_w = f[f"{img_id}/img_w"][()]
        boxes = f[f"{img_id}/boxes"][()]
        boxes[:, (0, 2)] /= img_w
        boxes[:, (1, 3)] /= img_h
        np.testing.assert_array_less(boxes, 1 + 1e-5)
        np.testing.assert_array_less(-boxes, 0 + 1e-5)
        boxes2.append(boxes)
    boxes = torch.from_numpy(np.stack(boxes2))
    boxes.clamp_(min=0.0, max=1.0)
    return feats, boxes


def two_image_sequence(vis_feats, boxes):
    """nlvr_model.py ([T] VLT5NLVR / [A] VLBartNLVR.train_step): (B, 2, V, C) -> one sequence of 2V tokens with
    img_order_ids [0]*V + [1]*V and obj_order_ids 0..V-1 twice."""
    B, _, V_L = vis_feats.shape[:3]
    vis_feats = vis_feats.view(B, 2 * V_L, -1)
    vis_pos = boxes.view(B, 2 * V_L, 4)
    img_order_ids = torch.tensor([0] * V_L + [1] * V_L, dtype=torch.long).view(1, 2 * V_L).expand(B, -1)
    obj_order_ids = torch.arange(V_L, dtype=torch.long).view(1, 1, V_L).expand(B, 2, -1).contiguous().view(B, 2 * V_L)
    return vis_feats, vis_pos, img_order_ids, obj_order_ids


# ------------------------------------------------------------------------------------------- VL-Adapter CLIP
def vl_adapter_vqa_clip_item(h5_path, img_id, sent, tokenizer, prompt="", post_prompt=""):
    """[A] vqa_clip_data.py __getitem__ 155-201: the per-image file, zero boxes, the task prompt."""
    out_dict = {}
    path = h5_path.joinpath(f"{img_id}.h5")
    with h5py.File(path, "r") as f:
        feats = f[f"{img_id}/features"][...]
        out_dict["vis_feats"] = feats  # (L, D)
        boxes = torch.zeros(feats.shape[0], 4)  # (L, 4)
        out_dict["boxes"] = boxes
    input_ids = tokenizer.encode(f"{prompt}{sent}{post_prompt}", max_length=20, truncation=True)
    out_dict["input_ids"] = torch.LongTensor(input_ids)
    out_dict["input_length"] = len(input_ids)
    return out_dict


def vl_adapter_vqa_clip_batch(h5_path, items, tokenizer, prompt=""):
    """[A] vqa_clip_data.py collate_fn: the same as VL-T5's (fp16 features summed into a float32 zero batch)."""
    batch = [vl_adapter_vqa_clip_item(h5_path, img_id, sent, tokenizer, prompt) for img_id, sent in items]
    return vl_t5_vqa_collate(batch, tokenizer)


def vl_adapter_nlvr_clip_item(h5_path, img0, img1):
    """[A] nlvr_clip_data.py __getitem__ 120-135 and collate 190-205: both images' grids, zero boxes, (2, V, C)."""
    feats2, boxes2 = [], []
    for img_id in (img0, img1):
        path = h5_path.joinpath(f"{img_id}.h5")
        with h5py.File(path, "r") as f:
            feats = f[f"{img_id}/features"][...]
            boxes = torch.zeros(feats.shape[0], 4)
        feats = torch.from_numpy(feats)
        boxes2.append(boxes)
        feats2.append(feats)
    vis_feats = torch.zeros(1, 2, feats2[0].shape[0], feats2[0].shape[1], dtype=torch.float)
    vis_feats[0] += torch.stack(feats2)
    return vis_feats[0], torch.stack(boxes2)
