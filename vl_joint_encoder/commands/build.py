"""`vl-joint-encoder build`: a ready encoder folder (model + processor + model card) from Hub models or local files.

    vl-joint-encoder build --text google-t5/t5-base --vision openai/clip-vit-base-patch32 --output-dir t5-clip
    vl-joint-encoder build --text Epoch30.pth --tokenizer google-t5/t5-base --vision openai/clip-vit-base-patch32 \
        --new-visual-projection --output-dir vlt5-clip
    vl-joint-encoder build --text LAST.pth --adapter-task vqa --tokenizer google-t5/t5-base --output-dir vladapter

Two steps, each through the code that owns it:
1. the text side: `conversion.convert` (T5 folders / Hub ids, VL-T5 and VL-Adapter checkpoints, and any source the
   converter learns later: `--source` is passed through, so a new source needs no change here), with its strict key
   accounting and its self-check against an independent functional encoder;
2. the vision side: `vision.attach_vision_tower` with a CLIP / SigLIP checkpoint (its own image preprocessing through
   `vision.processor_for_tower`), or no tower: the model then takes the precomputed features its checkpoint was
   trained on (`--vision none`).
The folder is checked before it is moved into place (reloaded with AutoModel / AutoProcessor: text-only outputs equal
the converted encoder's, visual tokens equal the tower's own hidden states, one image + one question give a finite
embedding), and holds a model card whose usage snippet runs as written.

This module sits in the top layer with `conversion` (layers.txt): its body imports the converter.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from . import command_main


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]  # config, weights, tokenizer, preprocessing
CARD_TEMPLATE = "built_model_card"
PROJECT_URL = "https://github.com/vl-joint-encoder/vl-joint-encoder"


@dataclass
class BuildArguments:
    text: str = field(
        metadata={"help": "the text side: a T5 Hub id or folder (google-t5/t5-base, google/t5-v1_1-base), or a VL-T5 "
                          "Epoch30.pth / VL-Adapter LAST.pth checkpoint"}
    )
    output_dir: str = field(metadata={"help": "the folder to write (built aside, moved into place when checked)"})
    vision: str | None = field(
        default=None,
        metadata={"help": "CLIP / SigLIP tower: Hub id or folder (openai/clip-vit-base-patch32, "
                          "google/siglip-base-patch16-224); none (the default): the model takes precomputed features "
                          "(Faster R-CNN regions for VL-T5, CLIP grids for VL-Adapter, --feat-dim for T5)"},
    )
    source: str | None = field(
        default=None,
        metadata={"help": "the converter's source kind: t5, vl-t5, vl-adapter (default: detected from the weights)"},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "T5 tokenizer to extend to the VL-T5 layout (default: --text for a T5 model; required for "
                          "a .pth checkpoint: the T5 tokenizer it was trained with, e.g. google-t5/t5-base)"},
    )
    adapter_task: str | None = field(
        default=None, metadata={"help": "VL-Adapter: the task whose adapters to keep (listed when missing)"}
    )
    downsample: bool | None = field(
        default=None, metadata={"help": "VL-Adapter: max-pool the 7x7 CLIP grid to 6x6 (default: on for VL-Adapter)"}
    )
    feat_dim: int = field(
        default=2048, metadata={"help": "T5 without a tower: size of the precomputed visual features"}
    )
    relative_attention_max_distance: int = field(
        default=128, metadata={"help": "VL-T5 / VL-Adapter: not readable from the weights; 128 in every T5 size"}
    )
    vision_feature_layer: int | None = field(
        default=None, metadata={"help": "tower hidden state used as visual tokens (default: -1, the last layer)"}
    )
    vision_feature_select: Literal["patch", "cls_patch"] | None = field(
        default=None, metadata={"help": "patch: drop CLIP's CLS token (the default); cls_patch: keep it"}
    )
    vision_grid_pool_size: int | None = field(
        default=None, metadata={"help": "average-pool the patch grid to N x N tokens (default: no pooling)"}
    )
    vision_box_mode: Literal["grid", "zeros"] | None = field(
        default=None, metadata={"help": "boxes of the visual tokens: grid cells (the default) or zeros"}
    )
    vision_dtype: Literal["float32", "float16", "bfloat16"] | None = field(
        default=None, metadata={"help": "dtype the frozen tower runs in (default: the model's, float32)"}
    )
    new_visual_projection: bool = field(
        default=False,
        metadata={"help": "allow a tower whose width differs from the checkpoint's features (VL-T5's 2048-d regions "
                          "and CLIP's 768-d patches): the visual projection starts afresh and needs training"},
    )
    pooling: Literal["mean", "text_mean", "visual_mean", "first"] = field(
        default="mean", metadata={"help": "how token states become the retrieval embedding"}
    )
    projection_dim: int | None = field(
        default=None, metadata={"help": "a linear projection of the pooled vector to this size (default: none)"}
    )
    similarity: Literal["dot", "cosine"] = field(
        default="cosine", metadata={"help": "the score of training and search (logit scale 20 for cosine, 1 for dot)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the freshly initialised weights"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty --output-dir"})
    push_to_hub: str | None = field(default=None, metadata={"help": "also upload the folder to this Hub repo id"})
    private: bool = field(default=False, metadata={"help": "with --push-to-hub: create the repo private"})

    def __post_init__(self):
        if self.vision is not None and self.vision.lower() == "none":
            self.vision = None
        if os.path.isfile(self.output_dir):
            raise ValueError(f"--output-dir {self.output_dir} is a file")
        if os.path.isdir(self.output_dir) and os.listdir(self.output_dir) and not self.overwrite:
            raise ValueError(f"--output-dir {self.output_dir} is not empty: pass --overwrite, or another folder")
        if self.vision is None and any(
            value is not None
            for value in (self.vision_feature_layer, self.vision_feature_select, self.vision_grid_pool_size,
                          self.vision_box_mode, self.vision_dtype)
        ) or (self.vision is None and self.new_visual_projection):  # fmt: skip
            raise ValueError("--vision-* options and --new-visual-projection need a tower: give --vision")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"--projection-dim must be >= 1, got {self.projection_dim}")


@dataclass
class BuildResult:
    output_dir: str
    text_source: str
    text_checkpoint: str
    vision: str | None
    config: Any
    conversion: Any  # conversion's ConversionResult
    checks: list[dict] = field(default_factory=list)
    repo_url: str | None = None


def _is_hub_id(value: str) -> bool:
    return not os.path.exists(value) and bool(HUB_ID.match(value)) and not value.endswith((".pth", ".bin", ".pt"))


def local_snapshot(name: str, option: str, patterns: list[str] = HUB_PATTERNS) -> str:
    """A local path for `name`: the path itself, or a snapshot of the Hub repo holding only what is read (no
    duplicate TF / Flax / .bin weights when safetensors exist), downloaded with a progress bar."""
    if not _is_hub_id(name):
        if not os.path.exists(name):
            raise ValueError(f"--{option} {name!r} does not exist (a folder, a checkpoint file, or a Hub id)")
        return name
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(name, allow_patterns=patterns)
        if not any(entry.endswith(".safetensors") for entry in os.listdir(folder)) and "*.safetensors" in patterns:
            folder = snapshot_download(name, allow_patterns=[*patterns, "pytorch_model*.bin"])  # older repos
    except Exception as error:
        raise ValueError(f"--{option} {name!r}: cannot download it from the Hub ({type(error).__name__}: {error})") from None
    return folder


def sample_image(size: int = 224):
    """A deterministic test image (colour gradients and a disc): the build checks run without downloading one."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2) < 0.05
    pixels = np.stack([x, y, np.where(disc, 1.0, 0.3 * (1 - x))], axis=-1)
    return Image.fromarray((pixels * 255).astype(np.uint8), mode="RGB")


def _check_folder(folder: str, text_model, tower, question: str) -> list[dict]:
    """Reload `folder` as a user will and compare it with what it was built from (see the module docstring)."""
    import torch
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    checks = []
    with torch.no_grad():
        text_batch = processor(text=[question], return_tensors="pt")
        ours = model(**text_batch).last_hidden_state
        reference = text_model.eval()(**text_batch).last_hidden_state
        checks.append({"name": "text only: last_hidden_state equals the converted encoder's",
                       "max_abs_diff": float((ours - reference).abs().max()), "tolerance": 0.0})  # fmt: skip
        if tower is not None:
            batch = processor(text=[question], images=[sample_image()], return_tensors="pt")
            tokens = model.get_image_features(batch["pixel_values"])["visual_feats"][0]  # (V, C)
            config = model.config
            if config.vision_grid_pool_size is None:
                hidden = tower.eval()(pixel_values=batch["pixel_values"].flatten(0, 1).to(tower.dtype),
                                      output_hidden_states=True).hidden_states[config.vision_feature_layer][0]
                has_cls = hidden.shape[0] == tokens.shape[0] + 1
                expected = hidden[1:] if has_cls and config.vision_feature_select == "patch" else hidden
                checks.append({"name": "visual tokens equal the tower's own hidden states (transformers "
                                       f"{type(tower).__name__}, layer {config.vision_feature_layer})",
                               "max_abs_diff": float((tokens - expected.float()).abs().max()), "tolerance": 0.0})
            embedding = model.encode(**batch)
            if not bool(torch.isfinite(embedding).all()):
                raise ValueError(f"{folder}: the embedding of one image + one question is not finite")
            checks.append({"name": f"one image + one question through the processor: a finite embedding of size "
                                   f"{embedding.shape[-1]}", "max_abs_diff": None, "tolerance": None})
    for check in checks:
        if check["tolerance"] is not None and not check["max_abs_diff"] <= check["tolerance"]:
            raise ValueError(
                f"build check failed ({check['name']}): max abs diff {check['max_abs_diff']:.3g}; nothing was written"
            )
    return checks


def _write_card(result: BuildResult, folder: str, processor, repo_id: str | None) -> None:
    import torch
    import transformers

    from ..utils.io import atomic_path
    from ..utils.model_cards import CITATIONS, render_model_card, usage_code
    from ..utils.version import __version__

    config, conversion = result.config, result.conversion
    name = os.path.basename(os.path.abspath(result.output_dir))
    citations = [CITATIONS["t5"]]
    if conversion.source in ("vl-t5", "vl-adapter"):
        citations.append(CITATIONS["vl_t5"])
    if conversion.source == "vl-adapter":
        citations.append(CITATIONS["vl_adapter"])
    vision = None
    if config.vision_config is not None:
        vc = config.vision_config
        citations.append(CITATIONS["siglip" if vc.model_type.startswith("siglip") else "clip"])
        vision = {
            "checkpoint": result.vision, "kind": "SigLIP" if vc.model_type.startswith("siglip") else "CLIP", "hidden_size": vc.hidden_size,
            "layers": vc.num_hidden_layers, "image_size": vc.image_size, "patch_size": vc.patch_size,
            "feature_layer": config.vision_feature_layer, "feature_select": config.vision_feature_select,
            "grid_pool_size": config.vision_grid_pool_size, "box_mode": config.vision_box_mode,
            "image_processor": type(processor.image_processor).__name__,
        }  # fmt: skip
    new_projection = config.vision_config is not None and conversion.config.feat_dim != config.feat_dim
    card = render_model_card(
        CARD_TEMPLATE,
        card_data={"library_name": "transformers", "pipeline_tag": "feature-extraction",
                   "tags": ["vl-joint-encoder", "vision-language", "feature-extraction", "retrieval"],
                   "license": "apache-2.0" if conversion.source == "t5" else "other"},
        model_name=name,
        usage_code=usage_code(repo_id or result.output_dir, has_tower=config.vision_config is not None,
                              feat_dim=config.feat_dim),
        project_url=PROJECT_URL,
        text_checkpoint=result.text_checkpoint,
        text_source=conversion.source,
        source_sha256=conversion.source_sha256,
        adapter_task=conversion.mapping.adapter_task,
        key_summary=conversion.mapping.summary(),
        conversion_checks=[c.__dict__ for c in conversion.self_checks],
        build_checks=result.checks,
        vision=vision,
        feat_dim=config.feat_dim,
        new_projection=new_projection,
        config=config.to_dict(),
        embedding_size=config.projection_dim or config.d_model,
        package_version=__version__,
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
        citations=citations,
    )
    with atomic_path(os.path.join(folder, "README.md")) as tmp:
        card.save(tmp)


def build_encoder(args: BuildArguments) -> BuildResult:
    """Build `args.output_dir` (see the module docstring); raises ValueError on any bad input, writing nothing."""
    from transformers.utils import logging as hf_logging

    from conversion.convert_vl_t5_checkpoint import push_to_hub

    # downloads first (with progress bars), then the work on local files (without transformers' loading bars)
    vision = local_snapshot(args.vision, "vision") if args.vision is not None else None
    checkpoint = local_snapshot(args.text, "text")
    is_t5 = args.source == "t5" or (args.source is None and os.path.isdir(checkpoint))
    tokenizer = args.tokenizer
    if tokenizer is None:
        if not is_t5:
            raise ValueError(
                f"--text {args.text} is a checkpoint without a tokenizer: give --tokenizer, the T5 tokenizer it was "
                f"trained with (google-t5/t5-base for the released VL-T5 / VL-Adapter checkpoints)"
            )
        tokenizer = checkpoint
    else:
        tokenizer = local_snapshot(tokenizer, "tokenizer", ["*.json", "*.model", "*.txt"])
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        result = _build(args, vision, checkpoint, tokenizer, is_t5)
    finally:
        if progress:
            hf_logging.enable_progress_bar()
    if args.push_to_hub:
        try:
            result.repo_url = push_to_hub(args.output_dir, args.push_to_hub, private=args.private,
                                          commit_message=f"Add {os.path.basename(args.output_dir)} (vl-joint-encoder build)")  # fmt: skip
        except Exception as error:
            raise ValueError(
                f"{args.output_dir} was built, but the push to {args.push_to_hub!r} failed ({type(error).__name__}: "
                f"{error}); retry with `hf upload {args.push_to_hub} {args.output_dir}`"
            ) from None
    return result


def _build(args: BuildArguments, vision: str | None, checkpoint: str, tokenizer: str, is_t5: bool) -> BuildResult:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from conversion.convert_vl_t5_checkpoint import ConversionError, convert

    from ..modeling_joint_encoder import JointEncoderModel
    from ..processing_joint_encoder import JointEncoderProcessor
    from ..utils.io import atomic_path, temporary_name
    from ..vision import attach_vision_tower, load_vision_tower, processor_for_tower

    tower = None
    if vision is not None:
        try:
            tower = load_vision_tower(vision)
        except OSError as error:
            raise ValueError(f"--vision {args.vision!r}: {error}") from None
    # T5 gets a fresh visual projection anyway: size it for the tower's features
    feat_dim = tower.config.hidden_size if (tower is not None and is_t5) else args.feat_dim

    staging = temporary_name(args.output_dir)
    text_dir = os.path.join(staging, "text")
    os.makedirs(staging)
    try:
        try:
            conversion = convert(
                checkpoint, text_dir, source=args.source, adapter_task=args.adapter_task, tokenizer=tokenizer,
                downsample=args.downsample, feat_dim=feat_dim, pooling=args.pooling, projection_dim=args.projection_dim,
                similarity=args.similarity, seed=args.seed,
                relative_attention_max_distance=args.relative_attention_max_distance,
            )  # fmt: skip
        except ConversionError as error:
            raise ValueError(f"--text {args.text}: {error}") from None
        text_model = AutoModel.from_pretrained(text_dir).eval()
        tok = AutoTokenizer.from_pretrained(text_dir)
        if tower is not None and not isinstance(text_model, JointEncoderModel):  # a source whose model holds no tower
            raise ValueError(
                f"--text {args.text} converts to a {type(text_model).__name__}, to which attach_vision_tower cannot "
                f"attach a tower yet: use --vision none (precomputed features)"
            )
        if tower is not None:
            if tower.config.hidden_size != text_model.config.feat_dim and not args.new_visual_projection:
                raise ValueError(
                    f"--text {args.text} was trained on {text_model.config.feat_dim}-d visual features but the tower "
                    f"{args.vision} gives {tower.config.hidden_size}-d ones: pass --new-visual-projection to start a "
                    f"new visual projection (it then needs training), or --vision none to keep the features the "
                    f"checkpoint expects"
                )
            torch.manual_seed(args.seed)
            model = attach_vision_tower(
                text_model, tower, vision_feature_layer=args.vision_feature_layer,
                vision_feature_select=args.vision_feature_select, vision_grid_pool_size=args.vision_grid_pool_size,
                vision_box_mode=args.vision_box_mode, vision_tower_dtype=args.vision_dtype,
                reinit_feat_embedding=args.new_visual_projection,
            )  # fmt: skip
            processor = processor_for_tower(model, tok, vision)
        else:
            model = text_model
            processor = JointEncoderProcessor.from_model_config(model.config, tok)
        result = BuildResult(
            output_dir=args.output_dir, text_source=conversion.source, text_checkpoint=args.text, vision=args.vision,
            config=model.config, conversion=conversion,
        )  # fmt: skip
        with atomic_path(args.output_dir) as folder:
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
            result.checks = _check_folder(folder, text_model, tower, "what is the name of this place?")
            _write_card(result, folder, processor, args.push_to_hub)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def build(args: BuildArguments) -> int:
    result = build_encoder(args)
    c, conversion = result.config, result.conversion
    print(f"text: {args.text} ({conversion.source}; keys {conversion.mapping.summary()})")
    for check in conversion.self_checks:
        print(f"  converter self-check ({check.name}): max abs diff {check.max_abs_diff:.3g} <= {check.tolerance:g}")
    if c.vision_config is not None:
        print(f"vision: {args.vision} ({c.vision_config.model_type}, {c.vision_config.hidden_size}-d, "
              f"{c.vision_config.num_hidden_layers} layers, {c.vision_config.image_size} px)")
    else:
        print(f"vision: none: the model takes precomputed {c.feat_dim}-d visual features")
    for check in result.checks:
        diff = "" if check["tolerance"] is None else f": max abs diff {check['max_abs_diff']:.3g}"
        print(f"  check: {check['name']}{diff}")
    print(f"head: {c.pooling} pooling{f', projection to {c.projection_dim}' if c.projection_dim else ''}, "
          f"{c.similarity} similarity (logit scale {c.logit_scale:g}); untrained: fine-tune with vl-joint-encoder train")
    print(f"saved: {result.output_dir} (model, processor, README.md model card)")
    if result.repo_url:
        print(f"pushed: {result.repo_url}")
    return 0


main = command_main(
    "vl-joint-encoder build",
    [BuildArguments],
    build,
    "Make a ready encoder folder (model + processor + model card) in one command: the text side converted from T5, "
    "VL-T5 or VL-Adapter (Hub id, folder or checkpoint file), the vision side a CLIP / SigLIP tower or the "
    "precomputed features the checkpoint expects, plus pooling, projection and similarity.",
)

if __name__ == "__main__":
    sys.exit(main())
