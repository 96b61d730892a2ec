"""Convert a VL-T5 / VL-Adapter / VL-BART / VL-Adapter-BART checkpoint, or a transformers T5 / BART checkpoint, into
a `JointEncoderModel` directory.

    python conversion/convert_vl_t5_checkpoint.py --checkpoint snap/pretrain/VLT5/Epoch30.pth \
        --output-dir vlt5-encoder --tokenizer t5-base [--push-to-hub user/vlt5-encoder]
    python conversion/convert_vl_t5_checkpoint.py --checkpoint snap/pretrain/VLBart/Epoch30.pth \
        --output-dir vlbart-encoder --source vl-bart --tokenizer facebook/bart-base

Steps (as transformers' `convert_*_original_*` scripts): load the file safely (`torch.load(weights_only=True)` or
safetensors), map keys with strict accounting (`conversion/key_map.py`), infer the config from tensor shapes
(`conversion/bart.py` for BART), build the output in a temporary directory next to the target, reload it from disk
and compare it with an independent functional encoder on the source state dict (`conversion/functional_encoder.py`),
write the model card, rename the directory into place, optionally push it to the Hub in one commit. Specs:
`shared/docs/vl_t5_encoder_spec.md`, `docs/vl_bart_encoder_spec.md`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


if __package__ in (None, ""):  # run as a script: make `conversion` and `vl_joint_encoder` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers.utils import logging  # noqa: E402

import vl_joint_encoder  # noqa: E402  (registers the auto classes: save_pretrained then exports the code)
from conversion.bart import check_bart_config, infer_bart_config, load_bart  # noqa: E402
from conversion.functional_encoder import (  # noqa: E402
    BartEncoderHyperParameters,
    EncoderHyperParameters,
    bart_encoder_forward,
    encoder_forward,
)
from conversion.key_map import (  # noqa: E402
    ADAPTER_KEY,
    BART_SOURCES,
    SOURCES,
    VISUAL_NORM_LAYOUTS,
    ConversionError,
    KeyMapping,
    adapter_and_downsample_kwargs,
    adapters_are_shared,
    check_mapping,
    check_source_matches,
    choose_adapter_task,
    choose_bart_adapter_task,
    choose_visual_norm_layout,
    detect_source,
    map_bart_keys,
    map_keys,
    strip_prefixes,
    to_original_bart_layout,
    to_original_layout,
    unsupported_variants,
    unused_visual_norm_prefixes,
)
from conversion.text_prefixes import resolve_text_prefix  # noqa: E402
from vl_joint_encoder import JointEncoderConfig, JointEncoderModel, JointEncoderProcessor  # noqa: E402
from vl_joint_encoder.configuration_joint_encoder import POOLING_MODES, SIMILARITIES  # noqa: E402
from vl_joint_encoder.utils.errors import run_guarded  # noqa: E402
from vl_joint_encoder.utils.io import remove_stale_temporaries, temporary_name  # noqa: E402


logger = logging.get_logger(__name__)

DEFAULT_TOLERANCE = 1e-5  # float64 comparison: conversion errors only
FLOAT32_TOLERANCE = 1e-3  # float32 comparison: rounding over many layers, see self_check
N_VIS_IDS = 100  # <vis_extra_id_0..99>
MODEL_CARD_TEMPLATE = "converted_model_card"
PROJECT_URL = "https://github.com/vl-joint-encoder/vl-joint-encoder"


@dataclass
class SelfCheck:
    name: str
    max_abs_diff: float
    tolerance: float


@dataclass
class ConversionResult:
    output_dir: Path
    source: str
    source_detected: bool
    config: JointEncoderConfig
    mapping: KeyMapping
    source_sha256: str
    self_checks: list[SelfCheck] = field(default_factory=list)
    has_tokenizer: bool = False
    repo_url: str | None = None


# --------------------------------------------------------------------------------------------------------- loading
def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, or of a directory's weight files (sorted by name)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="sha256", disable=total < 200_000_000) as bar:
        for file in files:
            with open(file, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """
    A plain state dict from a `.pth`/`.bin` file (`torch.load(weights_only=True)`: never runs pickled code) or a
    `.safetensors` file. Raises ConversionError for a missing, truncated/corrupt or unsafe file, or a non-state-dict.
    """
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise ConversionError(
            f"checkpoint {str(path)!r} is a directory: give the .pth file (or --source t5 for a T5 dir)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as error:
            raise ConversionError(
                f"cannot read {path.name} as safetensors (truncated or corrupt?): {error}"
            ) from error
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if "weights_only" in str(error) or "Unsupported global" in str(error):
                raise ConversionError(
                    f"{path.name} needs arbitrary code to unpickle (it stores Python objects, not only tensors), so "
                    f"it was refused and nothing in it was executed. If you trust it, re-save its tensors with "
                    f"`torch.save(model.state_dict(), 'clean.pth')`. Details: {str(error).splitlines()[0]}"
                ) from error
            raise ConversionError(f"cannot read {path.name} (truncated or corrupt?): {error}") from error
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
            raise ConversionError(f"cannot read {path.name} (truncated or corrupt?): {error}") from error
        except Exception as error:  # e.g. a text file named .pth: the unpickler fails with a KeyError
            raise ConversionError(
                f"{path.name} is not a PyTorch checkpoint (torch.load failed: {type(error).__name__}: {error}); give "
                f"the .pth / .bin / .safetensors file the training script saved"
            ) from None
    return _as_state_dict(obj, path.name)


def _as_state_dict(obj, name: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model"):
        obj = next(iter(obj.values()))  # {"model": state_dict} wrappers
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{name} holds a {type(obj).__name__}, not a state dict (parameter name -> tensor)")
    bad = [key for key, value in obj.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise ConversionError(
            f"{name} is not a state dict: {len(bad)} entries are not tensors (e.g. {bad[:3]}); save "
            f"`model.state_dict()`, not a training checkpoint with optimizer state"
        )
    return obj


def load_t5(checkpoint: str | Path):
    """(state dict, T5Config, directory) of a transformers T5 checkpoint: a local directory, or a hub id."""
    from transformers import T5Config

    directory = Path(checkpoint)
    if not directory.is_dir():
        if directory.exists() or os.sep in str(checkpoint) or str(checkpoint).startswith("."):
            raise ConversionError(f"--source t5 needs a transformers T5 directory or hub id, got {str(checkpoint)!r}")
        from huggingface_hub import snapshot_download

        try:
            directory = Path(
                snapshot_download(str(checkpoint), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
            )
        except Exception as error:
            raise ConversionError(
                f"cannot find {str(checkpoint)!r} locally nor download it from the Hub: {error}"
            ) from error
    try:
        t5_config = T5Config.from_pretrained(directory)
    except Exception as error:
        raise ConversionError(f"{directory} has no readable T5 config.json: {error}") from error
    if t5_config.model_type not in ("t5", "mt5", "umt5"):
        raise ConversionError(f"{directory} holds a {t5_config.model_type!r} model, not T5")
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"{directory} has no model.safetensors / pytorch_model.bin")
    state = {}
    for file in files:
        state.update(load_state_dict(file))
    return state, t5_config, directory


# ----------------------------------------------------------------------------------------------------- config
def infer_config(
    state: dict[str, torch.Tensor], adapter_task: str | None, downsample: bool, visual_norm_layout: str | None = None,
    **head_kwargs,
) -> JointEncoderConfig:
    """Every size from tensor shapes (spec: 'Every size can be read off the state dict shapes'); the visual norm
    layout from the keys (`visual_norm_layout` must be given when the file holds both)."""
    for key in (
        "shared.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "encoder.visual_embedding.feat_embedding.0.weight",
    ):
        if key not in state:
            raise ConversionError(f"the checkpoint has no {key!r}: cannot read the encoder's sizes (is it VL-T5?)")
    vocab_size, d_model = state["shared.weight"].shape
    buckets, num_heads = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    inner = state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    if inner % num_heads:
        raise ConversionError(
            f"q has {inner} rows, not a multiple of the {num_heads} heads of the relative bias table"
        )
    num_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.block."))
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    d_ff = state[f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight"].shape[0]
    vis = "encoder.visual_embedding."
    feat_dim = state[vis + "feat_embedding.0.weight"].shape[1]
    layout = choose_visual_norm_layout(state, visual_norm_layout, "encoder.")
    order = vis + "img_order_embedding.weight" in state
    kwargs = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
        feat_dim=feat_dim,
        n_images=state[vis + "img_order_embedding.weight"].shape[0] if order else 2,
        use_vis_order_embedding=order,
        use_vis_layer_norm=layout != "none",
        individual_vis_layer_norm=layout != "after-sum",
    )
    adapter_key = None
    if adapter_task is not None:
        adapter_key = f"encoder.block.0.layer.0.attn_adapter.adapters.{adapter_task}.down_sampler.weight"
    kwargs.update(adapter_and_downsample_kwargs(state, adapter_key, d_model, downsample))
    return JointEncoderConfig(**kwargs, **head_kwargs)


# ------------------------------------------------------------------------------------------------------ T5 source
def extend_vocabulary(embedding: torch.Tensor, num_text_tokens: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """
    (rows, d) T5 embedding -> (vocab_size, d): rows [0, num_text_tokens) copied, T5's padding rows beyond the tokenizer
    dropped, new rows (the `<vis_extra_id_*>`) drawn from a normal with the mean and per-dimension std of the copied
    rows, so they have the scale of real token embeddings and differ from one another (cf. Hewitt, 2021,
    "Initializing New Word Embeddings for Pretrained Language Models").
    """
    text = embedding[:num_text_tokens].float()  # (n_text, d)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(vocab_size - num_text_tokens, text.shape[1], generator=generator)  # (n_new, d)
    new = text.mean(0) + noise * text.std(0)
    return torch.cat([text, new], dim=0).to(embedding.dtype)  # (vocab_size, d)


# --------------------------------------------------------------------------------------------------- self-check
def _random_inputs(config: JointEncoderConfig, max_text_id: int, seed: int = 0):
    """Typical-magnitude inputs: token ids with </s> and padding, features ~ N(0, 1), valid boxes."""
    generator = torch.Generator().manual_seed(seed)
    if config.backbone == "bart":  # <s> ... </s> then padding (BART ids: bos 0, pad 1, eos 2)
        input_ids = torch.randint(3, max_text_id, (2, 11), generator=generator)
        input_ids[:, 0] = 0
        input_ids[:, -1] = 2
        input_ids[1, -4:] = torch.tensor([2, 1, 1, 1])
    else:
        input_ids = torch.randint(2, max_text_id, (2, 11), generator=generator)
        input_ids[:, -1] = 1
        input_ids[1, -3:] = 0
    num_visual = (config.visual_downsample_size + 1) ** 2 if config.visual_downsample_size else 7
    feats = torch.randn(2, num_visual, config.feat_dim, generator=generator)
    xy1 = torch.rand(2, num_visual, 2, generator=generator) * 0.5
    boxes = torch.cat([xy1, xy1 + torch.rand(2, num_visual, 2, generator=generator) * 0.5], dim=-1)
    return input_ids, feats, boxes


@torch.no_grad()
def self_check(
    model_dir: str | Path,
    original_state: dict[str, torch.Tensor],
    hp: EncoderHyperParameters | BartEncoderHyperParameters,
    tolerance: float = DEFAULT_TOLERANCE,
    text_only_state: dict[str, torch.Tensor] | None = None,
    max_text_id: int | None = None,
    float32_tolerance: float = FLOAT32_TOLERANCE,
) -> list[SelfCheck]:
    """
    Reload `model_dir` from disk and compare its `last_hidden_state` with the functional encoder of the backbone
    (`encoder_forward` for T5 hyper-parameters, `bart_encoder_forward` for BART ones) on `original_state`, with random
    text + visual inputs (and text only on `text_only_state`, the untouched T5 / BART weights, when given).

    The exactness check runs in float64 (model and reference cast), against `tolerance`: it isolates conversion
    errors from rounding. fp32 rounding alone reaches ~6e-5 at t5-small scale (measured: our fp32 output and a fp32
    run of the reference both differ from the float64 result by that much), so the fp32 comparison (sdpa and eager
    attention) is held to `float32_tolerance`. Raises ConversionError when either is exceeded.
    """
    config_json = json.loads((Path(model_dir) / "config.json").read_text())
    if "AutoModel" not in config_json.get("auto_map", {}):
        raise ConversionError("config.json has no auto_map.AutoModel: the directory would not load with remote code")
    model = JointEncoderModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    input_ids, feats, boxes = _random_inputs(model.config, max_text_id or model.config.vocab_size)
    bart = isinstance(hp, BartEncoderHyperParameters)
    encoder_forward_ = bart_encoder_forward if bart else encoder_forward

    def double(state):
        return {k: v.double() if v.is_floating_point() else v for k, v in state.items()}

    def single(state):  # a float16 / bfloat16 checkpoint is upcast, as load_state_dict upcast it into the model
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

    reference = encoder_forward_(double(original_state), hp, input_ids, None, feats.double(), boxes.double())
    model.double()
    ours = model(input_ids=input_ids, visual_feats=feats.double(), visual_pos=boxes.double()).last_hidden_state
    checks = [SelfCheck("float64, text + visual tokens", float((ours - reference).abs().max()), tolerance)]
    if text_only_state is not None:
        text_reference = encoder_forward_(double(text_only_state), hp, input_ids=input_ids)
        ours = model(input_ids=input_ids).last_hidden_state  # (B, L, d)
        checks.append(
            SelfCheck(
                f"float64, text only, against the original {'BART' if bart else 'T5'} weights",
                float((ours - text_reference).abs().max()),
                tolerance,
            )  # fmt: skip
        )
    reference32 = encoder_forward_(single(original_state), hp, input_ids=input_ids, visual_feats=feats, visual_pos=boxes)
    float32_diff = 0.0
    for implementation in ("sdpa", "eager"):  # both attention paths a user may load
        model = JointEncoderModel.from_pretrained(model_dir, attn_implementation=implementation).float().eval()
        ours = model(input_ids=input_ids, visual_feats=feats, visual_pos=boxes).last_hidden_state  # (B, L + V, d)
        float32_diff = max(float32_diff, float((ours - reference32).abs().max()))
    checks.append(SelfCheck("float32 (sdpa and eager attention), text + visual tokens", float32_diff,
                            float32_tolerance))  # fmt: skip
    for check in checks:
        logger.info(
            f"self-check ({check.name}): max abs diff {check.max_abs_diff:.3g} (tolerance {check.tolerance:g})"
        )
        if not check.max_abs_diff <= check.tolerance:  # also catches NaN
            raise ConversionError(
                f"self-check failed ({check.name}): the converted model differs from the original computation by "
                f"{check.max_abs_diff:.3g} > {check.tolerance:g}; the output directory was not written"
            )
    return checks


# ---------------------------------------------------------------------------------------------- output directory
def _prepare_output(output_dir: Path, overwrite: bool) -> Path:
    """A fresh hidden temporary folder next to `output_dir` (`.NAME.tmp-PID-HEX`), after removing the ones killed
    conversions left (their process no longer runs)."""
    removed = remove_stale_temporaries(output_dir)
    if removed:
        logger.info(f"removed {len(removed)} temporary folder(s) of interrupted conversions: {removed}")
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"--output-dir {str(output_dir)!r} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(
            f"--output-dir {str(output_dir)!r} exists and is not empty: choose another directory or pass --overwrite"
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(temporary_name(output_dir))
    tmp.mkdir()  # an ordinary directory (the umask applies), pid-tagged so that a later run can tell it is stale
    return tmp


def _move_into_place(tmp: Path, output_dir: Path) -> None:
    old = None
    if output_dir.exists():
        old = Path(temporary_name(output_dir))  # a kill before the rmtree leaves it stale: the next run removes it
        os.replace(output_dir, old)
    os.replace(tmp, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _describe(keys: list[str], limit: int = 6) -> str:
    groups: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        head = ".".join(parts[:2]) if parts[0] == "encoder" and len(parts) > 2 else parts[0]
        if ".adapters." in key:
            head = "adapters of task " + key.split(".adapters.")[1].split(".")[0]
        groups[head] = groups.get(head, 0) + 1
    text = ", ".join(f"`{name}*` ({count})" for name, count in sorted(groups.items())[:limit])
    return text + (", ..." if len(groups) > limit else "") if groups else "none"


# the command that makes each family's features from a folder of photos (README "Features from photos")
CLIP_GRID_COMMAND = (
    "vl-joint-encoder extract-features --model RN101.pt --preprocessing vl_adapter --images PHOTOS --output FEATURES"
)
REGION_ROUTE = (
    "no detector installs here: read the released *_obj36.h5 files (or LXMERT's *_obj36.tsv) with --feature_store, "
    "or run the bottom-up-attention detector elsewhere and write that HDF5 layout (docs/visual_features.md)"
)


def expected_visual_features(source: str, config: JointEncoderConfig) -> dict | None:
    """The features a converted checkpoint was trained on, recorded as `config.visual_features` (the card names them;
    encode / search refuse others: `vl_joint_encoder.data.feature_stores.check_visual_features`). None for T5 / BART
    sources, whose visual embedding is new and takes any extractor once fine-tuned."""
    if source in ("vl-adapter", "vl-adapter-bart"):
        rn101 = config.feat_dim == 2048
        return {
            "kind": "clip_grid",
            "backbone": "RN101" if rn101 else None,
            "layer": "layer4 (the grid before the attention pool)",
            "grid": [7, 7],
            "num_tokens": 49,
            "feat_dim": config.feat_dim,
            "boxes": False,
            "preprocessing": "vl_adapter",
            "downsample": "7 x 7 -> 6 x 6 max pool inside the model" if config.visual_downsample_size else None,
            "description": (
                "CLIP RN101 layer4 grid, 7 x 7 = 49 tokens of 2048-d, from 224 x 224 bicubic squashed RGB images "
                "(ylsung/VL_adapter feature_extraction/coco_CLIP.py), zero boxes"
                if rn101 else f"a CLIP grid of 49 tokens of {config.feat_dim}-d (VL-Adapter's coco_CLIP.py), zero boxes"
            ),
            "extract": CLIP_GRID_COMMAND,
        }
    if source in ("vl-t5", "vl-bart"):
        return {
            "kind": "faster_rcnn",
            "backbone": "Faster R-CNN ResNet-101 C4 trained on Visual Genome (bottom-up attention)",
            "layer": "res5 box features, mean-pooled",
            "grid": None,
            "num_tokens": 36,
            "feat_dim": config.feat_dim,
            "boxes": True,
            "preprocessing": None,
            "downsample": None,
            "description": (
                f"36 bottom-up-attention regions of {config.feat_dim}-d with their boxes (VL-T5 / LXMERT "
                "*_obj36.h5 layout)"
            ),
            "extract": REGION_ROUTE,
        }
    return None


def write_model_card(result: ConversionResult, checkpoint: Path, repo_id: str | None, new_keys: list[str]):
    import transformers

    from vl_joint_encoder.utils.model_cards import CITATIONS, render_model_card

    bart = result.config.backbone == "bart"
    source_description = {
        "vl-t5": "VL-T5 (Cho et al., 2021)",
        "vl-adapter": "VL-Adapter (Sung et al., 2022) on VL-T5",
        "t5": "T5 (Raffel et al., 2020), extended with a freshly initialised VL-T5 visual embedding",
        "vl-bart": "VL-BART (Cho et al., 2021)",
        "vl-adapter-bart": "VL-Adapter (Sung et al., 2022) on VL-BART",
        "bart": "BART (Lewis et al., 2020), extended with a freshly initialised VL-BART visual embedding",
    }[result.source]
    backbone_citation = CITATIONS["bart"] if bart else CITATIONS["t5"]
    citations = [backbone_citation] if result.source in ("t5", "bart") else [CITATIONS["vl_t5"]]
    if result.source in ("vl-adapter", "vl-adapter-bart"):
        citations.append(CITATIONS["vl_adapter"])
    if result.source not in ("t5", "bart"):
        citations.append(backbone_citation)
    config = result.config
    feature_note = (
        "CLIP grid features, all-zero boxes"
        if result.source in ("vl-adapter", "vl-adapter-bart")
        else "Faster R-CNN region features as in VL-T5 / LXMERT"
        if result.source in ("vl-t5", "vl-bart")
        else f"any extractor giving {config.feat_dim}-d features, once fine-tuned"
    )
    name = repo_id or result.output_dir.name
    card_data = dict(
        library_name="transformers",
        tags=["vl-bart" if bart else "vl-t5", "vision-language", "feature-extraction", "retrieval"],
        pipeline_tag="feature-extraction",
        license="apache-2.0" if result.source in ("t5", "bart") else "other",
    )
    norm_description = (
        "per projection" if config.individual_vis_layer_norm else "after the sum"
    ) if config.use_vis_layer_norm else "none"
    card = render_model_card(
        MODEL_CARD_TEMPLATE,
        card_data=card_data,
        model_name=name.split("/")[-1],
        repo_id=name,
        project_url=PROJECT_URL,
        source_description=source_description,
        source_kind=result.source,
        source_file=checkpoint.name,
        source_sha256=result.source_sha256,
        adapter_task=result.mapping.adapter_task,
        converter_version=vl_joint_encoder.__version__,
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
        n_kept=len(result.mapping.kept),
        n_tied=len(result.mapping.tied),
        n_ignored=len(result.mapping.ignored),
        kept_description=_describe(list(result.mapping.kept.values())),
        tied_keys=", ".join(f"`{k}`" for k in result.mapping.tied) or "none",
        ignored_description=_describe(result.mapping.ignored),
        new_description=_describe(new_keys) if new_keys else "",
        config=config.to_dict(),
        self_checks=[c.__dict__ for c in result.self_checks],
        has_tokenizer=result.has_tokenizer,
        example_visual_tokens=49 if config.visual_downsample_size else 36,
        feature_note=feature_note,
        visual_features=getattr(config, "visual_features", None),
        encoder_description="BART encoder layers" if bart else "T5 encoder blocks",
        visual_norm_description=norm_description,
        example_ids="[0, 13, 27, 5, 2]" if bart else "[13, 27, 5, 1]",
        example_ids_note="VL-BART token ids, <s> = 0, </s> = 2" if bart else "VL-T5 token ids, </s> = 1",
        tokenizer_note="a bart-base tokenizer extended to the VL-BART layout (200 tokens appended)" if bart
        else "a T5 tokenizer extended to the VL-T5 layout",
        tokenizer_builder="build_vl_bart_tokenizer" if bart else "build_vl_t5_tokenizer",
        pretraining_data="COCO, Visual Genome, BART's text corpora" if bart else "COCO, Visual Genome, C4 for T5",
        limitations=[],
        citations=citations,
    )
    return card


# ---------------------------------------------------------------------------------------------------------- hub
def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, commit_message: str | None = None) -> str:
    """Create the repo (if needed) and upload the whole folder (model, code, tokenizer, card) in ONE commit."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message=commit_message or "Add joint encoder converted with vl-joint-encoder",
    )
    return str(getattr(info, "commit_url", info))


# ------------------------------------------------------------------------------------------------------ convert
def _load_tokenizer(name_or_path: str, vocab_size: int | None, backbone: str = "t5"):
    from transformers import AutoTokenizer

    from vl_joint_encoder.tokenization_joint_encoder import build_vl_bart_tokenizer, build_vl_t5_tokenizer

    try:
        base = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as error:
        raise ConversionError(f"cannot load the tokenizer {name_or_path!r}: {error}") from error
    try:
        tokenizer = (build_vl_bart_tokenizer if backbone == "bart" else build_vl_t5_tokenizer)(base)
    except ValueError as error:
        raise ConversionError(f"the tokenizer {name_or_path!r} does not fit: {error}") from error
    if vocab_size is not None and len(tokenizer) != vocab_size:
        raise ConversionError(
            f"the {'VL-BART' if backbone == 'bart' else 'VL-T5'} tokenizer built from {name_or_path!r} has "
            f"{len(tokenizer)} tokens but the checkpoint's embedding has {vocab_size} rows: it is not the tokenizer "
            f"this model was trained with"
        )
    return tokenizer


def _detect_directory_source(checkpoint: Path) -> str:
    """'t5' or 'bart' for a transformers checkpoint folder, from its config.json."""
    config_path = checkpoint / "config.json"
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, ValueError) as error:
        raise ConversionError(f"{checkpoint} is a directory without a readable config.json ({error}): give the .pth "
                              f"file, or a transformers T5 / BART directory") from error
    if model_type in ("t5", "mt5", "umt5"):
        return "t5"
    if model_type == "bart":
        return "bart"
    raise ConversionError(f"{checkpoint} holds a {model_type!r} model: --source t5 / bart take T5 or BART folders")


@dataclass
class _Converted:
    """What a source branch of `convert` hands to the shared save / self-check / card steps."""

    model: JointEncoderModel
    mapping: KeyMapping
    hp: EncoderHyperParameters | BartEncoderHyperParameters
    original: dict[str, torch.Tensor]  # the state the functional reference runs on (original layout)
    fresh: set[str]
    max_text_id: int
    text_only_state: dict[str, torch.Tensor] | None = None
    tokenizer: object | None = None


def _head_kwargs(pooling: str, projection_dim: int | None, similarity: str) -> dict:
    return dict(
        pooling=pooling,
        projection_dim=projection_dim,
        similarity=similarity,
        logit_scale=20.0 if similarity == "cosine" else 1.0,
    )


def _load_mapped(config: JointEncoderConfig, mapping: KeyMapping, state: dict, seed: int):
    """(model, fresh keys): `config`'s model with the checkpoint's kept tensors, every key accounted for
    (`check_mapping`); the retrieval projection, which no checkpoint has, is initialised from `seed`."""
    torch.manual_seed(seed)
    model = JointEncoderModel(config).eval()
    fresh = {k for k in model.state_dict() if k.startswith("projection.")}
    check_mapping(mapping, state, {k: v for k, v in model.state_dict().items() if k not in fresh})
    model.load_state_dict({ours: state[theirs] for ours, theirs in mapping.kept.items()}, strict=False)
    return model, fresh


def _convert_bart_family(
    source: str, state: dict, adapter_task, tokenizer, downsample, visual_norm_layout, num_heads,
    scale_embedding, share_vis_lang_layer_norm, task, text_prefix, head_kwargs, seed,
) -> _Converted:
    """VL-BART / VL-Adapter-BART state dict (prefix-stripped) -> our model, with strict accounting."""
    task_kept = choose_bart_adapter_task(state, adapter_task)
    if source == "vl-adapter-bart" or task_kept is not None:
        single = adapters_are_shared(state)
    else:
        single = False
    prefix = resolve_text_prefix(source, task, task_kept, single, text_prefix)
    config, layout = infer_bart_config(
        state, task_kept, downsample, visual_norm_layout, num_heads, scale_embedding, share_vis_lang_layer_norm,
        text_prefix=prefix, **head_kwargs,
    )
    mapping = map_bart_keys(state, adapter_task=task_kept, visual_norm_layout=layout)
    hp = BartEncoderHyperParameters(
        num_heads=config.num_heads,
        visual_norm_layout=layout,
        share_vis_lang_layer_norm=config.share_vis_lang_layer_norm,
        scale_embedding=config.scale_embedding,
        layer_norm_epsilon=config.layer_norm_epsilon,
        activation=config.dense_act_fn,
        adapter_task=task_kept,
        downsample=config.visual_downsample_size,
        pad_token_id=config.pad_token_id,
    )
    model, fresh = _load_mapped(config, mapping, state, seed)
    tok = _load_tokenizer(tokenizer, config.vocab_size, "bart") if tokenizer is not None else None
    return _Converted(model, mapping, hp, state, fresh, config.vocab_size, tokenizer=tok)


def _convert_bart_folder(
    checkpoint: Path, tokenizer, feat_dim, visual_norm_layout, share_vis_lang_layer_norm, text_prefix, head_kwargs,
    seed,
) -> _Converted:
    """A transformers BART folder -> our model: text weights copied, vocabulary extended by the 200 VL-BART tokens,
    visual embedding new (one LayerNorm after the sum, as VL-BART's released scripts, unless told otherwise)."""
    state, bart_config, _ = load_bart(checkpoint, load_state_dict)
    check_bart_config(bart_config)
    mapping = map_bart_keys(state)
    if "shared.weight" not in mapping.kept:
        raise ConversionError("the BART checkpoint has no model.shared.weight / model.encoder.embed_tokens.weight")
    embedding = state[mapping.kept["shared.weight"]]
    tok = None
    if tokenizer is not None:
        tok = _load_tokenizer(tokenizer, None, "bart")
        num_text = len(tok) - 2 * N_VIS_IDS
    else:
        num_text = embedding.shape[0]
        logger.warning(f"no --tokenizer: assuming all {num_text} embedding rows are tokens")
    if num_text > embedding.shape[0]:
        raise ConversionError(
            f"the tokenizer has {num_text} text tokens but the BART embedding only {embedding.shape[0]} rows: not this "
            f"model's tokenizer"
        )
    layout = visual_norm_layout or "after-sum"
    if layout not in VISUAL_NORM_LAYOUTS:
        raise ConversionError(f"--visual-norm-layout must be one of {VISUAL_NORM_LAYOUTS}, got {layout!r}")
    activation = bart_config.activation_function
    if activation not in ("gelu", "relu", "gelu_new", "silu"):
        raise ConversionError(f"BART activation_function {activation!r} is not supported")
    config = JointEncoderConfig(
        backbone="bart",
        vocab_size=num_text + 2 * N_VIS_IDS,  # + <extra_id_99..0> + <vis_extra_id_99..0>
        d_model=bart_config.d_model,
        d_ff=bart_config.encoder_ffn_dim,
        num_layers=bart_config.encoder_layers,
        num_heads=bart_config.encoder_attention_heads,
        max_position_embeddings=bart_config.max_position_embeddings,
        scale_embedding=bool(bart_config.scale_embedding),
        share_vis_lang_layer_norm=share_vis_lang_layer_norm,
        feed_forward_proj=activation,
        dropout_rate=bart_config.dropout,
        attention_dropout=bart_config.attention_dropout,
        activation_dropout=bart_config.activation_dropout,
        feat_dim=feat_dim,
        use_vis_layer_norm=layout != "none",
        individual_vis_layer_norm=layout != "after-sum",
        text_prefix=text_prefix,
        **head_kwargs,
    )
    hp = BartEncoderHyperParameters(
        num_heads=config.num_heads, visual_norm_layout=layout, share_vis_lang_layer_norm=share_vis_lang_layer_norm,
        scale_embedding=config.scale_embedding, activation=activation, pad_token_id=config.pad_token_id,
    )
    torch.manual_seed(seed)
    model = JointEncoderModel(config).eval()
    fresh = {k for k in model.state_dict() if k.startswith(("visual_embedding.", "projection."))}
    expected = {k: v for k, v in model.state_dict().items() if k not in fresh}
    expected["shared.weight"] = embedding  # its shape changes below
    check_mapping(mapping, state, expected)
    new_state = {ours: state[theirs] for ours, theirs in mapping.kept.items()}
    new_state["shared.weight"] = extend_vocabulary(embedding, num_text, config.vocab_size, seed=seed)
    model.load_state_dict(new_state, strict=False)
    text_state = {"model.shared.weight": embedding,
                  **{k: v for k, v in state.items() if k.startswith("model.encoder.") and ".visual_embedding." not in k}}
    return _Converted(model, mapping, hp, to_original_bart_layout(model.state_dict()), fresh, num_text,
                      text_only_state=text_state, tokenizer=tok)


@torch.no_grad()
def convert(
    checkpoint: str | Path,
    output_dir: str | Path,
    source: str | None = None,
    adapter_task: str | None = None,
    tokenizer: str | None = None,
    downsample: bool | None = None,
    feat_dim: int = 2048,
    pooling: str = "mean",
    projection_dim: int | None = None,
    similarity: str = "cosine",
    overwrite: bool = False,
    push_to_hub_repo: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    relative_attention_max_distance: int = 128,
    visual_norm_layout: str | None = None,
    num_heads: int | None = None,
    scale_embedding: bool = False,
    share_vis_lang_layer_norm: bool = False,
    task: str | None = None,
    text_prefix: str | None = None,
) -> ConversionResult:
    """
    Convert, self-check, save (atomically) and optionally push. Raises ConversionError on any bad input.
    `relative_attention_max_distance` is the one setting a VL-T5 state dict does not reveal (128 in every T5 size);
    for `source="t5"` it is read from the T5 config instead. For VL-BART the weights do not reveal `num_heads`
    (default: bart-base's 12 / bart-large's 16 by d_model), `scale_embedding` and `share_vis_lang_layer_norm` (both
    False in every released script). `visual_norm_layout` must be given for a file holding both norm layouts.
    `text_prefix` (None: from `task` / `adapter_task`, see `conversion.text_prefixes`) goes to the config.
    """
    if source is not None and source not in SOURCES:
        raise ConversionError(f"--source must be one of {SOURCES}, got {source!r}")
    if pooling not in POOLING_MODES or similarity not in SIMILARITIES:
        raise ConversionError(f"--pooling must be in {POOLING_MODES} and --similarity in {SIMILARITIES}")
    if visual_norm_layout is not None and visual_norm_layout not in VISUAL_NORM_LAYOUTS:
        raise ConversionError(f"--visual-norm-layout must be one of {VISUAL_NORM_LAYOUTS}, got {visual_norm_layout!r}")
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    head_kwargs = _head_kwargs(pooling, projection_dim, similarity)

    detected = source is None
    if source is None and checkpoint.is_dir():
        source = _detect_directory_source(checkpoint)
    raw = None
    if source == "t5":
        raw, t5_config, _ = load_t5(checkpoint)
    elif source != "bart":
        raw = load_state_dict(checkpoint)
        if source is not None:
            check_source_matches(raw, source, downsample)
        source = source or detect_source(raw)
    if detected:
        logger.info(f"detected source: {source}")
    bart_family = source in BART_SOURCES
    if source not in ("vl-bart", "vl-adapter-bart", "bart") and (
        num_heads is not None or scale_embedding or share_vis_lang_layer_norm
    ):
        raise ConversionError("--num-heads / --scale-embedding / --share-vis-lang-layer-norm apply to VL-BART sources")
    if downsample and source not in ("vl-adapter", "vl-adapter-bart"):
        raise ConversionError("--downsample only applies to VL-Adapter checkpoints (CLIP grid features)")
    downsample = source in ("vl-adapter", "vl-adapter-bart") if downsample is None else downsample
    if raw is not None:
        unsupported = unsupported_variants(raw)
        if unsupported:
            listing = "; ".join(f"{name}: {len(keys)} keys, e.g. {keys[0]!r}" for name, keys in unsupported.items())
            raise ConversionError(
                f"unsupported checkpoint variant, refused: {listing}. Only bottleneck adapters "
                f"(use_adapter, optionally use_single_adapter) can be converted"
            )
    sha = sha256_of(checkpoint)

    if source == "bart":
        if adapter_task is not None or task is not None or scale_embedding or num_heads is not None:
            raise ConversionError("--source bart reads heads and scale_embedding from the BART config and has no task")
        converted = _convert_bart_folder(
            checkpoint, tokenizer, feat_dim, visual_norm_layout, share_vis_lang_layer_norm, text_prefix, head_kwargs,
            seed,
        )
    elif bart_family:
        state = strip_prefixes(raw, source)
        converted = _convert_bart_family(
            source, state, adapter_task, tokenizer, downsample, visual_norm_layout, num_heads, scale_embedding,
            share_vis_lang_layer_norm, task, text_prefix, head_kwargs, seed,
        )
    elif source == "t5":
        if task is not None or adapter_task is not None:
            raise ConversionError("--source t5 starts from a text-only T5: it has no task (use --text-prefix)")
        state = strip_prefixes(raw, source)
        mapping = map_keys(state)
        if "shared.weight" not in mapping.kept:
            raise ConversionError("the T5 checkpoint has no shared.weight / encoder.embed_tokens.weight")
        embedding = state[mapping.kept["shared.weight"]]
        tok = None
        if tokenizer is not None:
            tok = _load_tokenizer(tokenizer, None)
            num_text = len(tok) - N_VIS_IDS
        else:
            # t5-*: 32128 rows for 32100 tokens (the rest is padding to a multiple of 128)
            num_text = 32100 if embedding.shape[0] == 32128 else embedding.shape[0]
            if embedding.shape[0] != 32128:
                logger.warning(f"no --tokenizer: assuming all {num_text} embedding rows are tokens")
        if num_text > embedding.shape[0]:
            raise ConversionError(
                f"the tokenizer has {num_text} text tokens but the T5 embedding only "
                f"{embedding.shape[0]} rows: not this model's tokenizer"
            )
        act = t5_config.dense_act_fn
        config = JointEncoderConfig(
            vocab_size=num_text + N_VIS_IDS,
            d_model=t5_config.d_model,
            d_kv=t5_config.d_kv,
            d_ff=t5_config.d_ff,
            num_layers=t5_config.num_layers,
            num_heads=t5_config.num_heads,
            relative_attention_num_buckets=t5_config.relative_attention_num_buckets,
            relative_attention_max_distance=t5_config.relative_attention_max_distance,
            layer_norm_epsilon=t5_config.layer_norm_epsilon,
            feed_forward_proj=t5_config.feed_forward_proj,
            feat_dim=feat_dim,
            dropout_rate=t5_config.dropout_rate,
            text_prefix=text_prefix,
            **head_kwargs,
        )
        hp = EncoderHyperParameters(
            num_heads=config.num_heads,
            relative_attention_num_buckets=config.relative_attention_num_buckets,
            relative_attention_max_distance=config.relative_attention_max_distance,
            layer_norm_epsilon=config.layer_norm_epsilon,
            feed_forward_act=act,
            gated=t5_config.is_gated_act,
        )
        torch.manual_seed(seed)
        model = JointEncoderModel(config).eval()
        fresh = {k for k in model.state_dict() if k.startswith(("visual_embedding.", "projection."))}
        expected = {k: v for k, v in model.state_dict().items() if k not in fresh}
        expected["shared.weight"] = embedding  # its shape changes below
        check_mapping(mapping, state, expected)
        new_state = {ours: state[theirs] for ours, theirs in mapping.kept.items()}
        new_state["shared.weight"] = extend_vocabulary(embedding, num_text, config.vocab_size, seed=seed)
        model.load_state_dict(new_state, strict=False)
        t5_text_state = {"shared.weight": embedding, **{k: v for k, v in state.items() if k.startswith("encoder.")}}
        original = to_original_layout(model.state_dict())  # the source's text weights + the fresh visual ones
        converted = _Converted(model, mapping, hp, original, fresh, num_text, text_only_state=t5_text_state,
                               tokenizer=tok)
    else:
        state = strip_prefixes(raw, source)
        task_kept = choose_adapter_task(state, adapter_task)
        layout = choose_visual_norm_layout(state, visual_norm_layout, "encoder.")
        mapping = map_keys(state, adapter_task=task_kept, visual_norm_layout=layout)
        single = task_kept is not None and adapters_are_shared(state, ADAPTER_KEY)
        prefix = resolve_text_prefix(source, task, task_kept, single, text_prefix)
        config = infer_config(
            state, task_kept, downsample, layout, relative_attention_max_distance=relative_attention_max_distance,
            text_prefix=prefix, **head_kwargs,
        )
        hp = EncoderHyperParameters(
            num_heads=config.num_heads,
            relative_attention_num_buckets=config.relative_attention_num_buckets,
            relative_attention_max_distance=config.relative_attention_max_distance,
            layer_norm_epsilon=config.layer_norm_epsilon,
            feed_forward_act=config.dense_act_fn,
            gated=config.is_gated_act,
            adapter_task=task_kept,
            downsample=config.visual_downsample_size,
        )
        model, fresh = _load_mapped(config, mapping, state, seed)
        # the functional reference reads the layout off the keys: drop the norm the chosen layout does not use
        unused = unused_visual_norm_prefixes(layout, "encoder.")
        original = {k: v for k, v in state.items() if not k.startswith(unused)} if unused else state
        tok = _load_tokenizer(tokenizer, config.vocab_size) if tokenizer is not None else None
        converted = _Converted(model, mapping, hp, original, fresh, config.vocab_size, tokenizer=tok)
    model, mapping = converted.model, converted.mapping
    logger.info(f"{source}: {mapping.summary()}")
    if converted.tokenizer is None:
        logger.warning(
            f"no --tokenizer given: the output will have no tokenizer (users must build the "
            f"{'VL-BART' if model.config.backbone == 'bart' else 'VL-T5'} one)"
        )

    model.config.visual_features = expected_visual_features(source, model.config)
    tmp = _prepare_output(output_dir, overwrite)
    try:
        model.save_pretrained(tmp)
        if converted.tokenizer is not None:
            converted.tokenizer.save_pretrained(tmp)
            # the processor carries the config's text prefix and the input checks: what encode / search / train load.
            # Loading AutoProcessor registers ours for the remote-code export (vl_joint_encoder.registration).
            from transformers import AutoProcessor  # noqa: F401

            JointEncoderProcessor.from_model_config(model.config, converted.tokenizer).save_pretrained(tmp)
        checks = self_check(
            tmp, converted.original, converted.hp, tolerance, text_only_state=converted.text_only_state,
            max_text_id=converted.max_text_id,
        )
        result = ConversionResult(
            output_dir=output_dir,
            source=source,
            source_detected=detected,
            config=model.config,
            mapping=mapping,
            source_sha256=sha,
            self_checks=checks,
            has_tokenizer=converted.tokenizer is not None,
        )
        write_model_card(result, checkpoint, push_to_hub_repo, sorted(converted.fresh)).save(tmp / "README.md")
        _move_into_place(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if push_to_hub_repo:
        try:
            result.repo_url = push_to_hub(output_dir, push_to_hub_repo, private=private, commit_message=commit_message)
        except Exception as error:
            raise ConversionError(
                f"the model was converted and saved in {output_dir}, but the push to {push_to_hub_repo!r} failed "
                f"({type(error).__name__}: {error}); retry with `hf upload {push_to_hub_repo} {output_dir}`"
            ) from error
    return result


# ------------------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_vl_t5_checkpoint",
        description="Extract the joint encoder of a VL-T5 / VL-Adapter / VL-BART / VL-Adapter-BART checkpoint (or "
        "start one from T5 or BART) as a transformers model directory loadable with "
        "AutoModel.from_pretrained(DIR, trust_remote_code=True).",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="VL-T5 / VL-BART Epoch30.pth, VL-Adapter LAST.pth/BEST.pth, or a transformers T5 / BART directory or "
        "hub id (--source t5 / bart)",
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--source", choices=SOURCES, help="detected from the keys when absent")
    parser.add_argument("--adapter-task", help="VL-Adapter: which task's adapters to keep (listed when missing)")
    parser.add_argument(
        "--downsample",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="VL-Adapter: max-pool the 7x7 CLIP grid to 6x6 as its scripts do (default: on)",
    )
    parser.add_argument(
        "--tokenizer",
        help="T5 tokenizer (e.g. t5-base) or BART tokenizer (e.g. facebook/bart-base), path or hub id, to extend to the "
        "VL-T5 / VL-BART layout (checked if it has it already) and save",
    )
    parser.add_argument("--feat-dim", type=int, default=2048, help="--source t5 / bart: size of the visual features")
    parser.add_argument(
        "--visual-norm-layout",
        choices=("per-projection", "after-sum", "none"),
        help="read off the keys; needed when a file holds both (per-projection: individual_vis_layer_norm True; "
        "after-sum: False). --source bart: the new visual embedding's (default after-sum, VL-BART's scripts)",
    )
    parser.add_argument("--num-heads", type=int, help="VL-BART: heads per layer (default 12 / 16 for d_model 768 / 1024)")
    parser.add_argument("--scale-embedding", action="store_true", help="VL-BART: the backbone scaled embeddings "
                        "(False for bart-base and bart-large)")
    parser.add_argument("--share-vis-lang-layer-norm", action="store_true",
                        help="VL-BART: trained with --share_vis_lang_layer_norm (no released script)")
    parser.add_argument("--task", help="VL-T5 / VL-BART: the task the checkpoint was trained on (vqa, gqa, nlvr, "
                        "caption, refcoco, mmt), whose text prefix is recorded; VL-Adapter: --adapter-task's")
    parser.add_argument("--text-prefix", help="the text prefix to record instead of the task's ('' for none)")
    parser.add_argument(
        "--relative-attention-max-distance",
        type=int,
        default=128,
        help="VL-T5 / VL-Adapter: not readable from the weights; 128 for every released T5 size",
    )
    parser.add_argument("--pooling", choices=POOLING_MODES, default="mean")
    parser.add_argument("--projection-dim", type=int)
    parser.add_argument("--similarity", choices=SIMILARITIES, default="cosine")
    parser.add_argument(
        "--tolerance", type=float, default=DEFAULT_TOLERANCE, help="self-check max abs difference (float64 comparison)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights that are freshly initialised")
    parser.add_argument("--push-to-hub", metavar="REPO_ID")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--commit-message")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line: a ConversionError prints `error: ...` (exit status 1); any other exception one line too
    (`utils.errors.run_guarded`; VL_JOINT_ENCODER_DEBUG=1 shows the traceback)."""
    args = build_parser().parse_args(argv)
    logging.set_verbosity_info() if os.environ.get("VL_JOINT_ENCODER_VERBOSE") else logging.set_verbosity_warning()
    return run_guarded("convert_vl_t5_checkpoint", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    try:
        result = convert(
            args.checkpoint,
            args.output_dir,
            source=args.source,
            adapter_task=args.adapter_task,
            tokenizer=args.tokenizer,
            downsample=args.downsample,
            feat_dim=args.feat_dim,
            pooling=args.pooling,
            projection_dim=args.projection_dim,
            similarity=args.similarity,
            overwrite=args.overwrite,
            push_to_hub_repo=args.push_to_hub,
            private=args.private,
            commit_message=args.commit_message,
            tolerance=args.tolerance,
            seed=args.seed,
            relative_attention_max_distance=args.relative_attention_max_distance,
            visual_norm_layout=args.visual_norm_layout,
            num_heads=args.num_heads,
            scale_embedding=args.scale_embedding,
            share_vis_lang_layer_norm=args.share_vis_lang_layer_norm,
            task=args.task,
            text_prefix=args.text_prefix,
        )
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"source: {result.source}{' (detected from the keys)' if result.source_detected else ''}")
    if result.mapping.adapter_task:
        print(f"adapter task: {result.mapping.adapter_task}")
    print(f"keys: {result.mapping.summary()}")
    c = result.config
    print(
        f"config: {c.backbone}, vocab {c.vocab_size}, d_model {c.d_model}, layers {c.num_layers}, heads "
        f"{c.num_heads}x{c.d_kv}, d_ff {c.d_ff}, feat_dim {c.feat_dim}, n_images {c.n_images}"
    )
    if c.text_prefix is not None:
        print(f"text prefix: {c.text_prefix!r}")
    for check in result.self_checks:
        print(f"self-check ({check.name}): max abs diff {check.max_abs_diff:.3g} <= {check.tolerance:g}")
    if not result.has_tokenizer:
        print("warning: no --tokenizer given, the output has no tokenizer", file=sys.stderr)
    print(f"saved: {result.output_dir}")
    if result.repo_url:
        print(f"pushed: {result.repo_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
