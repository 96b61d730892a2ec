"""Images per second of each `extract-features` extractor (issue 13), end to end (decode + preprocess + tower +
shard writing) and split into its parts.

Extractors, with random weights at the real sizes (no weights can be downloaded here; the speed does not depend on
the values): OpenAI CLIP RN50 and RN101 (`vl_joint_encoder.clip_resnet`, as OpenAI-layout `.pt` files, VL-Adapter's
preprocessing at 224 px), RN50x4 at VL-Adapter's 224 px, and transformers' CLIP ViT-B/32 (a full `CLIPModel` folder
with its image processor, global `get_image_features` vectors).

    python benchmarks/bench_extract.py --num-images 32 --batch-size 16 --json /tmp/bench_extract.json
    python benchmarks/bench_extract.py --device cuda --num-images 2048 --batch-size 256   # on a GPU

The photos are scikit-image's (astronaut, coffee, chelsea, rocket, camera, ...), saved as JPEG and repeated to
`--num-images`. The ViQuAE goal (1.5M images in under an hour on one GPU) is >= 420 images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch
from PIL import Image


def _photos(folder: str, count: int) -> list[str]:
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "motorcycle_left", "hubble_deep_field"]
    arrays = []
    for name in names:
        try:
            arrays.append(getattr(data, name)())
        except Exception:  # some need an optional download (pooch): skip them
            continue
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"img{i:05d}.jpg")
        array = arrays[i % len(arrays)]
        if array.ndim == 3 and array.shape[2] == 4:
            array = array[..., :3]
        Image.fromarray(array).save(path, quality=90)
        paths.append(path)
    return paths


def _resnet_file(folder: str, preset: str) -> str:
    from vl_joint_encoder.clip_resnet import CLIPResNetVisionConfig, CLIPResNetVisionModel

    torch.manual_seed(0)
    model = CLIPResNetVisionModel(CLIPResNetVisionConfig.from_preset(preset))
    state = {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
    path = os.path.join(folder, f"{preset}.pt")
    torch.save(state, path)
    return path


def _clip_vit_folder(folder: str) -> str:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    config = CLIPConfig(
        text_config={"num_hidden_layers": 1},  # the text tower is not used
        vision_config={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "intermediate_size": 3072, "image_size": 224, "patch_size": 32},
        projection_dim=512,
    )  # fmt: skip
    path = os.path.join(folder, "clip-vit-b32")
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)
    return path


def _time_parts(model: str, paths: list[str], batch_size: int, device: str, options: dict) -> dict:
    """Decode + preprocess, and the tower alone, on the same images (best of the batches' sums)."""
    from vl_joint_encoder.data.extraction import load_extractor
    from vl_joint_encoder.images import load_image
    from vl_joint_encoder.modeling_joint_encoder import vision_tokens

    tower, processor, info = load_extractor(model, **{k: v for k, v in options.items() if k != "tokens"})
    tower.to(device)
    prep = forward = 0.0
    for start in range(0, len(paths), batch_size):
        t0 = time.perf_counter()
        images = [load_image(p) for p in paths[start : start + batch_size]]
        pixels = torch.from_numpy(np.asarray(processor(images=images, return_tensors="np")["pixel_values"]))
        t1 = time.perf_counter()
        vision_tokens(tower, pixels.to(device), info["feature_layer"], info["feature_select"], info["grid_pool_size"],
                      info["box_mode"], info["dtype"], return_pooled=True)  # fmt: skip
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        prep, forward = prep + t1 - t0, forward + time.perf_counter() - t1
    n = len(paths)
    return {"decode_preprocess_images_per_s": n / prep, "tower_images_per_s": n / forward}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--extractors", nargs="*", default=["RN50", "RN101", "RN50x4@224", "ViT-B/32"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from vl_joint_encoder.data.extraction import extract_features

    results = []
    with tempfile.TemporaryDirectory() as folder:
        photos = os.path.join(folder, "photos")
        os.makedirs(photos)
        paths = _photos(photos, args.num_images)
        for name in args.extractors:
            if name.startswith("RN"):
                preset = name.split("@")[0]
                model = _resnet_file(folder, preset)
                options = {"preprocessing": "vl_adapter", "image_size": 224, "tokens": "grid"}
            else:
                model = _clip_vit_folder(folder)
                options = {"tokens": "global"}
            # warm-up (first-call allocations), not timed
            extract_features(photos, os.path.join(folder, "warm"), model, batch_size=args.batch_size,
                             device=args.device, overwrite=True, max_shards=1, shard_size=args.batch_size,
                             **options)  # fmt: skip
            started = time.perf_counter()
            extract_features(photos, os.path.join(folder, f"out-{len(results)}"), model, batch_size=args.batch_size,
                             shard_size=512, device=args.device, **options)  # fmt: skip
            elapsed = time.perf_counter() - started
            row = {"extractor": name, "options": options, "images": args.num_images, "batch_size": args.batch_size,
                   "device": args.device, "end_to_end_images_per_s": args.num_images / elapsed,
                   **_time_parts(model, paths, args.batch_size, args.device, options)}  # fmt: skip
            results.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))
    report = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "results": results,
    }  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
