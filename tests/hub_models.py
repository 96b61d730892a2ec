"""Hub repositories with the real architectures (and random weights) that `vl-joint-encoder build` is pointed at in
the README, for the local Hub server (`hub_server.LocalHub`): nothing is downloaded.

- `google-t5/t5-base`: t5-base's config.json (d_model 768, d_ff 3072, 12 heads of 64, 32 buckets, max distance 128,
  ReLU, tied `lm_head`) as `T5ForConditionalGeneration` weights in the repo's layout (encoder, decoder, shared
  embedding). **Reduced for CI time**: 2 encoder layers and 1 decoder layer instead of 12 + 12, and a tokenizer
  trained here (500 tokens, with t5's 100 `<extra_id_*>`) instead of t5's 32100-piece sentencepiece model, so the
  embedding has 512 rows instead of 32128 (as in t5-base, a few more rows than tokens).
- `openai/clip-vit-base-patch32`: a full `CLIPModel` (text + vision, as the repo holds) whose vision side has ViT-B/32's
  sizes (hidden 768, MLP 3072, 12 heads, 32 px patches, 224 px images, projection 512) and the repo's own
  `preprocessor_config.json` (the original file, in its old `CLIPFeatureExtractor` format). **Reduced**: 2 vision
  layers instead of 12; a 1-layer text side with a 1000-token vocabulary instead of 12 layers and 49408 (the text side
  is never used: `attach_vision_tower` reads the vision tower only).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch


T5_BASE = "google-t5/t5-base"
CLIP_B32 = "openai/clip-vit-base-patch32"

# https://huggingface.co/openai/clip-vit-base-patch32/blob/main/preprocessor_config.json
CLIP_PREPROCESSOR_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}

TOKENIZER_TEXTS = [
    "who founded this place", "what is the name of this building", "when was it built", "which river flows here",
    "the tower was designed by an engineer and opened in the spring", "a photo of a bridge over a river at dusk",
    "this castle was built in the twelfth century by a king", "the city is known for its old market and its harbour",
    "Velisra was founded by Hugo Iver.", "what is this animal eating", "a cup of coffee on a wooden table",
] * 20  # fmt: skip


def write_t5_base(folder: Path, seed: int = 0) -> Path:
    """t5-base's architecture, reduced as the module docstring says, saved as the Hub repo holds it."""
    from transformers import T5Config, T5ForConditionalGeneration

    from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer

    tokenizer = train_vl_t5_tokenizer(TOKENIZER_TEXTS, vocab_size=400, n_vis=0)  # 400 pieces + 100 <extra_id_*>
    config = T5Config(
        architectures=["T5ForConditionalGeneration"], d_ff=3072, d_kv=64, d_model=768, decoder_start_token_id=0,
        dropout_rate=0.1, eos_token_id=1, feed_forward_proj="relu", initializer_factor=1.0, is_encoder_decoder=True,
        layer_norm_epsilon=1e-6, n_positions=512, num_heads=12, pad_token_id=0, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, tie_word_embeddings=True,
        num_layers=2, num_decoder_layers=1, vocab_size=len(tokenizer) + 12,  # reduced (t5-base: 12, 12, 32128)
    )  # fmt: skip
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_clip_vit_b32(folder: Path, seed: int = 0) -> Path:
    """openai/clip-vit-base-patch32's vision architecture, reduced as the module docstring says."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 1,
                     "vocab_size": 1000, "max_position_embeddings": 77, "projection_dim": 512,
                     "bos_token_id": 998, "eos_token_id": 999, "pad_token_id": 1},  # 49406, 49407, 1 in the repo
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                       "num_hidden_layers": 2, "patch_size": 32, "image_size": 224, "projection_dim": 512},
        projection_dim=512,
    )  # fmt: skip
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR_CONFIG, indent=2))
    return folder


def serve_folder(hub, repo_id: str, folder: Path) -> None:
    """Put every file of `folder` into the local Hub's `repo_id` as one commit (weights through LFS)."""
    from hub_server import LFS_SUFFIXES, Repo

    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    oid = hashlib.sha1((repo_id + "".join(sorted(files))).encode()).hexdigest()
    hub.repos[repo_id] = Repo(
        files=files,
        lfs={path for path in files if path.endswith(LFS_SUFFIXES)},
        commits=[{"oid": oid, "summary": "Upload", "paths": sorted(files)}],
    )


def serve_hub_models(hub, root: Path) -> dict[str, Path]:
    """Write both repositories under `root` (once) and serve them; returns repo id -> local folder."""
    folders = {T5_BASE: root / "t5-base", CLIP_B32: root / "clip-vit-base-patch32"}
    writers = {T5_BASE: write_t5_base, CLIP_B32: write_clip_vit_b32}
    for repo_id, folder in folders.items():
        if not (folder / "config.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            writers[repo_id](folder)
        serve_folder(hub, repo_id, folder)
    return folders
