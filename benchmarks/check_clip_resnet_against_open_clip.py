"""One-off check: vl_joint_encoder/clip_resnet.py against open_clip's and timm's CLIP ResNets, random weights.

Not part of the test-suite: open_clip and timm import torchvision, which the project's CPU torch lacks. Run it in a
scratch environment that has them, e.g.

    python -m venv /tmp/venv_b && . /tmp/venv_b/bin/activate
    pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch timm transformers scikit-image
    python benchmarks/check_clip_resnet_against_open_clip.py [--models RN50 RN101] [--json out.json]

What it does, per model: builds open_clip's `RN50` / `RN101` (pretrained=None), overwrites EVERY parameter and
BatchNorm buffer of its image tower with random values that keep activations O(1) (open_clip's own init zeroes each
block's bn3, which would make the residual branches vanish), copies open_clip's full CLIP `state_dict()` into
`CLIPResNetVisionModel` with the strict OpenAI-layout loader, and compares, on real photos (scikit-image), the layer4
grid (a forward hook on open_clip's `visual.layer4`) and the attention-pool output (`encode_image`). Then the same
weights through timm's `resnet*_clip` (timm's own OpenAI->timm converter) and back through our timm->OpenAI converter.
Preprocessing: open_clip's own eval transform vs `clip_preprocess`, torchvision's VL-Adapter Compose vs
`vl_adapter_preprocess`, transformers' CLIPImageProcessor (torchvision and PIL backends) vs ours.

clip_resnet.py is loaded from its file (importlib), not through the package: it must stand alone as remote code.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np
import torch


HERE = os.path.dirname(os.path.abspath(__file__))
CLIP_RESNET = os.path.join(HERE, "..", "vl_joint_encoder", "clip_resnet.py")


def load_clip_resnet():
    spec = importlib.util.spec_from_file_location("clip_resnet_standalone", CLIP_RESNET)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def randomise_visual(visual: torch.nn.Module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in visual.named_modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                lo, hi = (0.1, 0.3) if name.endswith("bn3") and "layer" in name else (0.5, 1.5)
                module.weight.copy_(lo + (hi - lo) * torch.rand(c, generator=g))
                module.bias.copy_(0.1 * torch.randn(c, generator=g))
                module.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                module.running_var.copy_(0.5 + torch.rand(c, generator=g))
        pool = visual.attnpool
        embed = pool.positional_embedding.shape[1]
        pool.positional_embedding.copy_(torch.randn(pool.positional_embedding.shape, generator=g) / embed**0.5)
        for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * embed**-0.5)
            linear.bias.copy_(0.02 * torch.randn(linear.bias.shape, generator=g))


def photos():
    import skimage.data as data
    from PIL import Image

    arrays = {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee(),
              "rocket": data.rocket(), "camera_grey": data.camera()}
    return {name: Image.fromarray(array) for name, array in arrays.items()}


def max_abs(a, b) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["RN50", "RN101"])
    parser.add_argument("--json", default=None, help="also write the results there")
    args = parser.parse_args(argv)

    import open_clip
    import PIL
    import timm
    import torchvision
    import transformers
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    ours = load_clip_resnet()
    results = {
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "open_clip": open_clip.__version__, "timm": timm.__version__,
                     "transformers": transformers.__version__, "Pillow": PIL.__version__, "numpy": np.__version__},
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "models": {},
    }
    images = photos()

    # ---- preprocessing
    _, _, openclip_preprocess = open_clip.create_model_and_transforms("RN50", pretrained=None)
    vl_adapter_tv = Compose([Resize((224, 224), interpolation=InterpolationMode.BICUBIC), CenterCrop((224, 224)),
                             ToTensor(), Normalize(ours.OPENAI_CLIP_MEAN, ours.OPENAI_CLIP_STD)])
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    pre = {}
    for name, image in images.items():
        rgb = image.convert("RGB")
        row = {
            "open_clip_transform_vs_clip_preprocess": max_abs(openclip_preprocess(image), ours.clip_preprocess(image)),
            "torchvision_vl_adapter_compose_vs_vl_adapter_preprocess":
                max_abs(vl_adapter_tv(rgb), ours.vl_adapter_preprocess(image)),
        }
        for mode in ("clip", "vl_adapter"):
            kwargs = ours.clip_image_processor_kwargs(mode)
            reference = ours.PREPROCESSORS[mode](image)
            for label, cls in (("torchvision", CLIPImageProcessor), ("pil", CLIPImageProcessorPil)):
                processed = cls(**kwargs)(rgb, return_tensors="pt")["pixel_values"][0]
                row[f"transformers_CLIPImageProcessor_{label}_{mode}_vs_ours"] = max_abs(processed, reference)
        pre[name] = row
    results["preprocessing_max_abs_diff"] = pre

    # ---- towers
    for model_name in args.models:
        started = time.time()
        clip_model, _, model_transform = open_clip.create_model_and_transforms(model_name, pretrained=None)
        clip_model = clip_model.eval()
        randomise_visual(clip_model.visual, seed=0)
        state_dict = clip_model.state_dict()  # full CLIP: visual.* + text tower
        config = ours.config_from_openai_state_dict(state_dict)
        model = ours.CLIPResNetVisionModel(config).eval()
        report = ours.load_openai_state_dict(model, state_dict)

        size = config.image_size
        batches = {
            "open_clip_transform": torch.stack([model_transform(im) for im in images.values()]),
            "vl_adapter_preprocess": ours.pixel_values_for(list(images.values()), mode="vl_adapter", image_size=size),
        }
        grids = {}
        hook = clip_model.visual.layer4.register_forward_hook(lambda m, i, o, store=grids: store.__setitem__("layer4", o))
        for im in images.values():  # open_clip's own transform at this model's size equals ours
            assert max_abs(model_transform(im), ours.clip_preprocess(im, size)) == 0.0, model_name
        row = {"config": {k: getattr(config, k) for k in ("layers", "width", "image_size", "output_dim", "heads")},
               "load_report": report}
        with torch.no_grad():
            for label, pixel_values in batches.items():
                pooled_ref = clip_model.encode_image(pixel_values)
                grid_ref = grids["layer4"].flatten(2).transpose(1, 2)
                out = model(pixel_values)
                row[label] = {
                    "grid_max_abs_diff": max_abs(out.last_hidden_state, grid_ref),
                    "grid_max_abs": float(grid_ref.abs().max()),
                    "pooled_max_abs_diff": max_abs(out.pooler_output, pooled_ref),
                    "pooled_max_abs": float(pooled_ref.abs().max()),
                }
        hook.remove()

        # timm: open_clip weights -> timm's own converter -> timm model; and timm state dict -> ours -> ours
        timm_name = {"RN50": "resnet50_clip", "RN101": "resnet101_clip", "RN50x4": "resnet50x4_clip"}.get(model_name)
        if timm_name is not None:
            from timm.models.byobnet import _convert_openai_clip

            timm_model = timm.create_model(timm_name, pretrained=False, num_classes=config.output_dim).eval()
            timm_model.load_state_dict(_convert_openai_clip(state_dict, timm_model), strict=True)
            back = ours.CLIPResNetVisionModel(config).eval()
            back_report = ours.load_openai_state_dict(back, ours.convert_timm_state_dict(timm_model.state_dict()))
            pixel_values = batches["vl_adapter_preprocess"]
            with torch.no_grad():
                feats = timm_model.forward_features(pixel_values)  # (N, C, g, g)
                pooled_timm = timm_model.forward_head(feats)
                out = model(pixel_values)
                out_back = back(pixel_values)
            row["timm"] = {
                "model": timm_name,
                "grid_max_abs_diff": max_abs(out.last_hidden_state, feats.flatten(2).transpose(1, 2)),
                "pooled_max_abs_diff": max_abs(out.pooler_output, pooled_timm),
                "timm_to_openai_keys_roundtrip_pooled_max_abs_diff": max_abs(out_back.pooler_output, out.pooler_output),
                "timm_to_openai_load_report": back_report,
            }
        row["seconds"] = round(time.time() - started, 1)
        results["models"][model_name] = row
        print(model_name, json.dumps(row, indent=1), flush=True)

    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
