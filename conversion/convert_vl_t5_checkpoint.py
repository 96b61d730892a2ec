"""Convert a VL-T5 / VL-Adapter checkpoint, or a transformers T5 checkpoint, into a `JointEncoderModel` directory.

    python conversion/convert_vl_t5_checkpoint.py --checkpoint snap/pretrain/VLT5/Epoch30.pth \
        --output-dir vlt5-encoder --tokenizer t5-base [--push-to-hub user/vlt5-encoder]

Steps (as transformers' `convert_*_original_*` scripts): load the file safely (`torch.load(weights_only=True)` or
safetensors), map keys with strict accounting (`conversion/key_map.py`), infer the config from tensor shapes, build
the output in a temporary directory next to the target, reload it from disk and compare it with an independent
functional encoder on the source state dict (`conversion/functional_encoder.py`), write the model card, rename the
directory into place, optionally push it to the Hub in one commit. Spec: `shared/docs/vl_t5_encoder_spec.md`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


if __package__ in (None, ""):  # run as a script: make `conversion` and `vl_joint_encoder` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers.utils import logging  # noqa: E402

import vl_joint_encoder  # noqa: E402  (registers the auto classes: save_pretrained then exports the code)
from conversion.functional_encoder import EncoderHyperParameters, encoder_forward  # noqa: E402
from conversion.key_map import (  # noqa: E402
    SOURCES,
    ConversionError,
    KeyMapping,
    check_mapping,
    check_not_vl_bart,
    choose_adapter_task,
    detect_source,
    map_keys,
    strip_prefixes,
    to_original_layout,
    unsupported_variants,
)
from vl_joint_encoder import JointEncoderConfig, JointEncoderModel  # noqa: E402
from vl_joint_encoder.configuration_joint_encoder import POOLING_MODES, SIMILARITIES  # noqa: E402


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
    state: dict[str, torch.Tensor], adapter_task: str | None, downsample: bool, **head_kwargs
) -> JointEncoderConfig:
    """Every size from tensor shapes (spec: 'Every size can be read off the state dict shapes')."""
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
    individual = vis + "feat_embedding.1.weight" in state
    shared_norm = vis + "layer_norm.weight" in state
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
        use_vis_layer_norm=individual or shared_norm,
        individual_vis_layer_norm=not shared_norm,
    )
    if adapter_task is not None:
        rows = state[f"encoder.block.0.layer.0.attn_adapter.adapters.{adapter_task}.down_sampler.weight"].shape[0]
        if d_model % rows:
            raise ConversionError(f"adapters of size {rows} do not divide d_model {d_model}: not a reduction factor")
        kwargs["adapter_reduction_factor"] = d_model // rows
    if downsample:
        kwargs["visual_downsample_size"] = 6  # VL-Adapter --downsample: 7x7 CLIP grid -> 6x6
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
    hp: EncoderHyperParameters,
    tolerance: float = DEFAULT_TOLERANCE,
    text_only_state: dict[str, torch.Tensor] | None = None,
    max_text_id: int | None = None,
    float32_tolerance: float = FLOAT32_TOLERANCE,
) -> list[SelfCheck]:
    """
    Reload `model_dir` from disk and compare its `last_hidden_state` with `encoder_forward(original_state)` on random
    text + visual inputs (and text only on `text_only_state`, the untouched T5 weights, when given).

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

    def double(state):
        return {k: v.double() if v.is_floating_point() else v for k, v in state.items()}

    reference = encoder_forward(double(original_state), hp, input_ids, None, feats.double(), boxes.double())
    model.double()
    ours = model(input_ids=input_ids, visual_feats=feats.double(), visual_pos=boxes.double()).last_hidden_state
    checks = [SelfCheck("float64, text + visual tokens", float((ours - reference).abs().max()), tolerance)]
    if text_only_state is not None:
        text_reference = encoder_forward(double(text_only_state), hp, input_ids=input_ids)
        ours = model(input_ids=input_ids).last_hidden_state  # (B, L, d)
        checks.append(
            SelfCheck(
                "float64, text only, against the original T5 weights",
                float((ours - text_reference).abs().max()),
                tolerance,
            )  # fmt: skip
        )
    reference32 = encoder_forward(original_state, hp, input_ids=input_ids, visual_feats=feats, visual_pos=boxes)
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
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"--output-dir {str(output_dir)!r} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(
            f"--output-dir {str(output_dir)!r} exists and is not empty: choose another directory or pass --overwrite"
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    return tmp


def _move_into_place(tmp: Path, output_dir: Path) -> None:
    old = None
    if output_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        os.replace(output_dir, old / "previous")
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


def write_model_card(result: ConversionResult, checkpoint: Path, repo_id: str | None, new_keys: list[str]):
    import transformers

    from vl_joint_encoder.utils.model_cards import CITATIONS, render_model_card

    source_description = {
        "vl-t5": "VL-T5 (Cho et al., 2021)",
        "vl-adapter": "VL-Adapter (Sung et al., 2022) on VL-T5",
        "t5": "T5 (Raffel et al., 2020), extended with a freshly initialised VL-T5 visual embedding",
    }[result.source]
    citations = [CITATIONS["t5"]] if result.source == "t5" else [CITATIONS["vl_t5"]]
    if result.source == "vl-adapter":
        citations.append(CITATIONS["vl_adapter"])
    if result.source != "t5":
        citations.append(CITATIONS["t5"])
    config = result.config
    feature_note = (
        "CLIP grid features, all-zero boxes"
        if result.source == "vl-adapter"
        else "Faster R-CNN region features as in VL-T5 / LXMERT"
        if result.source == "vl-t5"
        else f"any extractor giving {config.feat_dim}-d features, once fine-tuned"
    )
    name = repo_id or result.output_dir.name
    card_data = dict(
        library_name="transformers",
        tags=["vl-t5", "vision-language", "feature-extraction", "retrieval"],
        pipeline_tag="feature-extraction",
        license="apache-2.0" if result.source == "t5" else "other",
    )
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
def _load_tokenizer(name_or_path: str, vocab_size: int | None):
    from transformers import AutoTokenizer

    from vl_joint_encoder.tokenization_joint_encoder import build_vl_t5_tokenizer

    try:
        base = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as error:
        raise ConversionError(f"cannot load the tokenizer {name_or_path!r}: {error}") from error
    tokenizer = build_vl_t5_tokenizer(base)
    if vocab_size is not None and len(tokenizer) != vocab_size:
        raise ConversionError(
            f"the VL-T5 tokenizer built from {name_or_path!r} has {len(tokenizer)} tokens but the checkpoint's "
            f"embedding has {vocab_size} rows: it is not the tokenizer this model was trained with"
        )
    return tokenizer


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
) -> ConversionResult:
    """
    Convert, self-check, save (atomically) and optionally push. Raises ConversionError on any bad input.
    `relative_attention_max_distance` is the one setting a VL-T5 state dict does not reveal (128 in every T5 size);
    for `source="t5"` it is read from the T5 config instead.
    """
    if source is not None and source not in SOURCES:
        raise ConversionError(f"--source must be one of {SOURCES}, got {source!r}")
    if pooling not in POOLING_MODES or similarity not in SIMILARITIES:
        raise ConversionError(f"--pooling must be in {POOLING_MODES} and --similarity in {SIMILARITIES}")
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    head_kwargs = dict(
        pooling=pooling,
        projection_dim=projection_dim,
        similarity=similarity,
        logit_scale=20.0 if similarity == "cosine" else 1.0,
    )

    t5_text_state = None
    detected = source is None
    if source == "t5" or (source is None and checkpoint.is_dir()):
        source = "t5"
        raw, t5_config, _ = load_t5(checkpoint)
    else:
        raw = load_state_dict(checkpoint)
        check_not_vl_bart(raw)
        source = source or detect_source(raw)
    if detected:
        logger.info(f"detected source: {source}")
    if downsample and source != "vl-adapter":
        raise ConversionError("--downsample only applies to VL-Adapter checkpoints (CLIP grid features)")
    downsample = source == "vl-adapter" if downsample is None else downsample
    unsupported = unsupported_variants(raw)
    if unsupported:
        listing = "; ".join(f"{name}: {len(keys)} keys, e.g. {keys[0]!r}" for name, keys in unsupported.items())
        raise ConversionError(
            f"unsupported checkpoint variant, refused: {listing}. Only bottleneck adapters "
            f"(use_adapter, optionally use_single_adapter) can be converted"
        )
    state = strip_prefixes(raw, source)
    sha = sha256_of(checkpoint)

    tok = None
    if source == "t5":
        mapping = map_keys(state)
        if "shared.weight" not in mapping.kept:
            raise ConversionError("the T5 checkpoint has no shared.weight / encoder.embed_tokens.weight")
        embedding = state[mapping.kept["shared.weight"]]
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
        max_text_id = num_text
    else:
        task = choose_adapter_task(state, adapter_task)
        mapping = map_keys(state, adapter_task=task)
        config = infer_config(
            state, task, downsample, relative_attention_max_distance=relative_attention_max_distance, **head_kwargs
        )
        hp = EncoderHyperParameters(
            num_heads=config.num_heads,
            relative_attention_num_buckets=config.relative_attention_num_buckets,
            relative_attention_max_distance=config.relative_attention_max_distance,
            layer_norm_epsilon=config.layer_norm_epsilon,
            feed_forward_act=config.dense_act_fn,
            gated=config.is_gated_act,
            adapter_task=task,
            downsample=config.visual_downsample_size,
        )
        torch.manual_seed(seed)
        model = JointEncoderModel(config).eval()
        fresh = {k for k in model.state_dict() if k.startswith("projection.")}
        check_mapping(mapping, state, {k: v for k, v in model.state_dict().items() if k not in fresh})
        model.load_state_dict({ours: state[theirs] for ours, theirs in mapping.kept.items()}, strict=False)
        original = state
        max_text_id = config.vocab_size
        if tokenizer is not None:
            tok = _load_tokenizer(tokenizer, config.vocab_size)
    logger.info(f"{source}: {mapping.summary()}")
    if tok is None:
        logger.warning("no --tokenizer given: the output will have no tokenizer (users must build the VL-T5 one)")

    tmp = _prepare_output(output_dir, overwrite)
    try:
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        checks = self_check(tmp, original, hp, tolerance, text_only_state=t5_text_state, max_text_id=max_text_id)
        result = ConversionResult(
            output_dir=output_dir,
            source=source,
            source_detected=detected,
            config=model.config,
            mapping=mapping,
            source_sha256=sha,
            self_checks=checks,
            has_tokenizer=tok is not None,
        )
        write_model_card(result, checkpoint, push_to_hub_repo, sorted(fresh)).save(tmp / "README.md")
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
        description="Extract the joint encoder of a VL-T5 / VL-Adapter checkpoint (or start one from T5) as a "
        "transformers model directory loadable with AutoModel.from_pretrained(DIR, trust_remote_code=True).",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="VL-T5 Epoch30.pth, VL-Adapter LAST.pth/BEST.pth, or a transformers T5 directory / hub id (--source t5)",
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
    parser.add_argument("--tokenizer", help="T5 tokenizer (path or hub id) to extend to the VL-T5 layout and save")
    parser.add_argument("--feat-dim", type=int, default=2048, help="--source t5: size of the visual features")
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
    args = build_parser().parse_args(argv)
    logging.set_verbosity_info() if os.environ.get("VL_JOINT_ENCODER_VERBOSE") else logging.set_verbosity_warning()
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
        f"config: vocab {c.vocab_size}, d_model {c.d_model}, layers {c.num_layers}, heads {c.num_heads}x{c.d_kv}, "
        f"d_ff {c.d_ff}, feat_dim {c.feat_dim}, n_images {c.n_images}"
    )
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
