"""`vl-joint-encoder extract-features`: CLIP ViT / SigLIP / CLIP-ResNet grid (or global) features of images, resumable
shards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from . import command_main


DEFAULT_MAX_PIXELS = 16384 * 16384  # = images.DEFAULT_MAX_PIXELS (not imported: that module loads PIL)


@dataclass
class ExtractFeaturesArguments:
    model: str = field(
        metadata={"help": "joint encoder with a tower, CLIP/SigLIP checkpoint, or OpenAI CLIP ResNet (RN101.pt or a "
                  "saved CLIPResNetVisionModel folder)"}
    )
    output: str = field(metadata={"help": "output folder (resumed if it holds a previous run)"})
    images: str | None = field(
        default=None, metadata={"help": "folder of images (recursive); ids are relative paths without extension"}
    )
    dataset: str | None = field(default=None, metadata={"help": "a datasets folder (save_to_disk) with an image column"})
    split: str | None = field(default=None, metadata={"help": "split of a DatasetDict"})
    image_column: str = field(default="image", metadata={"help": "image column of --dataset"})
    id_column: str | None = field(default=None, metadata={"help": "column of image ids (default: the row number)"})
    format: Literal["safetensors", "arrow"] = field(default="safetensors", metadata={"help": "shard format"})
    batch_size: int = field(default=16, metadata={"help": "images per forward pass"})
    shard_size: int = field(default=512, metadata={"help": "images per shard"})
    feature_layer: int | None = field(default=None, metadata={"help": "hidden state of the tower (-1: last)"})
    feature_select: Literal["patch", "cls_patch"] | None = field(default=None, metadata={"help": "drop or keep CLS"})
    grid_pool_size: int | None = field(default=None, metadata={"help": "average-pool the patch grid to N x N"})
    box_mode: Literal["grid", "zeros"] | None = field(default=None, metadata={"help": "boxes of the visual tokens"})
    dtype: Literal["float32", "float16", "bfloat16"] | None = field(default=None, metadata={"help": "tower dtype"})
    tokens: Literal["grid", "global"] = field(
        default="grid", metadata={"help": "grid tokens, or the global image embedding as one token"}
    )
    preprocessing: Literal["vl_adapter", "clip"] | None = field(
        default=None, metadata={"help": "CLIP ResNet .pt only: VL-Adapter's squash or CLIP's crop (default: clip)"}
    )
    image_size: int | None = field(
        default=None, metadata={"help": "CLIP ResNet .pt only: input resolution (VL-Adapter: 224 for every model)"}
    )
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    skip_bad_images: bool = field(default=False, metadata={"help": "skip unreadable images (listed in the manifest)"})
    max_pixels: int | None = field(
        default=None,
        metadata={"help": "refuse images with more pixels, a decompression-bomb guard (default: "
                  f"$VL_JOINT_ENCODER_MAX_IMAGE_PIXELS, else {DEFAULT_MAX_PIXELS})"},
    )  # fmt: skip
    max_shards: int | None = field(default=None, metadata={"help": "stop after writing this many new shards"})
    overwrite: bool = field(default=False, metadata={"help": "discard a previous run in --output"})

    def __post_init__(self):
        if (self.images is None) == (self.dataset is None):
            raise ValueError("give exactly one of --images (a folder) and --dataset (a save_to_disk folder)")


def extract(args: ExtractFeaturesArguments) -> int:
    from ..data.extraction import extract_features
    from ..images import default_max_pixels

    if args.max_pixels is not None and args.max_pixels <= 0:
        raise ValueError(f"--max-pixels must be a positive number of pixels, got {args.max_pixels}")
    max_pixels = args.max_pixels if args.max_pixels is not None else default_max_pixels()

    if args.dataset:
        from datasets import DatasetDict, load_from_disk

        source = load_from_disk(args.dataset)
        if isinstance(source, DatasetDict):
            if args.split not in source:
                raise ValueError(f"--split must be one of {list(source)} for {args.dataset}")
            source = source[args.split]
    else:
        source = args.images
    manifest = extract_features(
        source, args.output, args.model, image_column=args.image_column, id_column=args.id_column,
        batch_size=args.batch_size, shard_size=args.shard_size, output_format=args.format,
        on_error="skip" if args.skip_bad_images else "raise", device=args.device, max_pixels=max_pixels,
        max_shards=args.max_shards, overwrite=args.overwrite, feature_layer=args.feature_layer,
        feature_select=args.feature_select, grid_pool_size=args.grid_pool_size, box_mode=args.box_mode,
        dtype=args.dtype, tokens=args.tokens, preprocessing=args.preprocessing, image_size=args.image_size,
    )  # fmt: skip
    count = sum(len(shard["ids"]) for shard in manifest["shards"])
    state = "complete" if manifest["complete"] else "partial (run again to resume)"
    print(f"{count} images in {len(manifest['shards'])} shards -> {args.output} [{state}]")
    for failure in manifest["failures"]:
        print(f"skipped {failure['id']}: {failure['reason']}")
    return 0


main = command_main(
    "vl-joint-encoder extract-features",
    [ExtractFeaturesArguments],
    extract,
    "CLIP ViT / SigLIP / OpenAI CLIP-ResNet grid (or global) features of a folder of images or a datasets image "
    "column, batched and resumable.",
)
