"""Parameter-efficient training with PEFT's LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

`wrap_with_lora` turns a `JointEncoderModel` into a `peft.PeftModel` whose trainable parameters are the LoRA matrices
of the chosen linear layers (default: the attention projections of every encoder layer and the projection of the
visual features into the encoder, which VL-Adapter trains too, Sung et al., 2022, sec. 4) and the modules in
`modules_to_save`, trained fully (default: the projection head, if any). The frozen vision tower never gets LoRA.

Saved with `save_pretrained`, a `PeftModel` writes the adapter alone in PEFT's format (`adapter_config.json`,
`adapter_model.safetensors`); `PeftModel.from_pretrained(JointEncoderModel.from_pretrained(base), folder)` loads it,
and `save_merged` writes the merged model (a plain `JointEncoderModel` folder).

The model's own VL-Adapter bottleneck adapters (`config.adapter_reduction_factor`) are the other parameter-efficient
option: `--train_only adapters` trains them (and the visual embedding and norms), see `training.freezing`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from ..utils.memory import peak_rss_mib


logger = logging.get_logger(__name__)

# the linear layers of each backbone, by name (modeling_joint_encoder: T5 attention q/k/v/o, feed-forward wi/wi_0/wi_1/wo;
# BART attention q_proj/k_proj/v_proj/out_proj, feed-forward fc1/fc2)
# `visual`: the projection of the visual features into the encoder (`visual_embedding.feat_embedding.0`)
TARGET_PRESETS = {
    "t5": {"attention": ["q", "k", "v", "o"], "ffn": ["wi", "wi_0", "wi_1", "wo"], "visual": ["feat_embedding.0"]},
    "bart": {"attention": ["q_proj", "k_proj", "v_proj", "out_proj"], "ffn": ["fc1", "fc2"],
             "visual": ["feat_embedding.0"]},
}  # fmt: skip
DEFAULT_TARGETS = ("attention", "visual")


def target_module_names(config, targets: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Module names (the end of their dotted name) LoRA wraps: presets `attention` / `ffn` / `visual` / `all-linear`
    of the backbone, or names of the model's linear layers (`q`, `wo`, `feat_embedding.0`, ...)."""
    presets = TARGET_PRESETS[config.backbone]
    names: list[str] = []
    for target in targets or DEFAULT_TARGETS:
        if target == "all-linear":
            names += presets["attention"] + presets["ffn"] + presets["visual"]
        elif target in presets:
            names += presets[target]
        else:
            names.append(target)
    return list(dict.fromkeys(names))


def target_modules_regex(model: torch.nn.Module, names: list[str], required: set[str] | None = None) -> str:
    """A regex (PEFT matches a string `target_modules` with `re.fullmatch` on each module's name) selecting the linear
    layers named `names` outside the vision tower. A name of `required` (default: all) that matches no layer raises;
    the others are dropped (a preset names `wi` and `wi_0`: a model has one or the other)."""
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    outside_tower = [name for name in linear if not name.startswith("vision_model.")]
    required = set(names) if required is None else required

    def present(target: str) -> bool:
        return any(name == target or name.endswith("." + target) for name in outside_tower)

    names = [target for target in names if target in required or present(target)]
    for target in names:
        if not present(target):
            layer_names = sorted({name.rsplit(".", 1)[-1] for name in outside_tower})
            raise ValueError(
                f"lora_target_modules: no linear layer of the encoder is named {target!r}; its linear layers are "
                f"named {layer_names} (or use the presets attention, visual, ffn, all-linear)"
            )
    return r"^(?!vision_model\.)(.*\.)?(" + "|".join(map(_escape, names)) + r")$"


def _escape(name: str) -> str:
    import re

    return re.escape(name)


def default_modules_to_save(model: torch.nn.Module) -> list[str]:
    """The projection head, if any: new in a retriever, it has no pretrained weights for LoRA to adapt."""
    return ["projection"] if getattr(model, "projection", None) is not None else []


def wrap_with_lora(
    model: torch.nn.Module,
    r: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    modules_to_save: list[str] | None = None,
):
    """`peft.get_peft_model(model, LoraConfig(...))` for a shared-tower `JointEncoderModel`: rank `r`, scaling
    `alpha / r` (default alpha = 2 r), LoRA on `target_modules` (see `target_module_names`), and `modules_to_save`
    trained fully (default: `default_modules_to_save`; `[]` for none)."""
    from peft import LoraConfig, get_peft_model

    from ..modeling_joint_encoder import JointEncoderModel

    if not isinstance(model, JointEncoderModel):
        raise ValueError(
            f"LoRA wraps a shared-tower JointEncoderModel, got {type(model).__name__}: separate towers "
            f"(--separate_towers, a query_encoder/ + passage_encoder/ folder) are not supported with --lora_r yet"
        )
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora_r must be an integer >= 1, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout}")
    names = target_module_names(model.config, target_modules)
    presets = set(TARGET_PRESETS[model.config.backbone]) | {"all-linear"}
    explicit = {target for target in (target_modules or []) if target not in presets}
    config = LoraConfig(
        r=r,
        lora_alpha=float(2 * r if alpha is None else alpha),
        lora_dropout=dropout,
        target_modules=target_modules_regex(model, names, explicit),
        modules_to_save=default_modules_to_save(model) if modules_to_save is None else list(modules_to_save),
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    peft_model.base_model.model.freeze_vision_model()
    log_parameters(peft_model, f"LoRA r={r} alpha={config.lora_alpha:g} on {names}, fully trained: "
                               f"{config.modules_to_save or []}")  # fmt: skip
    return peft_model


def parameter_counts(model: torch.nn.Module) -> dict[str, Any]:
    """Trainable / total parameters and the bytes they take (parameters only: activations and optimizer come on top;
    AdamW keeps two fp32 moments per trainable parameter)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "trainable": trainable,
        "total": total,
        "trainable_fraction": trainable / total if total else 0.0,
        "parameter_mib": total_bytes / 2**20,
        "trainable_parameter_mib": trainable_bytes / 2**20,
        "adamw_state_mib": 2 * trainable * 4 / 2**20,
    }


def log_parameters(model: torch.nn.Module, what: str = "") -> dict[str, Any]:
    counts = parameter_counts(model)
    logger.info(
        f"{what + ': ' if what else ''}{counts['trainable']:,} trainable parameters of {counts['total']:,} "
        f"({100 * counts['trainable_fraction']:.2f}%); parameters {counts['parameter_mib']:.1f} MiB, of which "
        f"trainable {counts['trainable_parameter_mib']:.2f} MiB (AdamW state {counts['adamw_state_mib']:.2f} MiB)"
    )
    return counts


def peak_memory_mib(device: torch.device | None = None) -> dict[str, float]:
    """Peak memory so far: the accelerator's allocator (CUDA) and the process's resident set (CPU)."""
    peaks = {}
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        peaks["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    peaks["cpu_peak_rss_mib"] = peak_rss_mib()
    return peaks


class ParameterAndMemoryLog(TrainerCallback):
    """Logs the trainable parameter count and memory when training starts, and the peak memory when it ends (into
    the Trainer's log history as well, so `trainer_state.json` keeps them)."""

    def __init__(self):
        self.counts: dict[str, Any] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.counts = log_parameters(model, "training")

    def on_train_end(self, args, state, control, **kwargs):
        peaks = peak_memory_mib(args.device)
        logger.info("peak memory: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
        if state.is_world_process_zero:
            state.log_history.append({"step": state.global_step, **{f"params_{k}": v for k, v in self.counts.items()},
                                      **peaks})  # fmt: skip


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The base model of a `PeftModel` (LoRA layers still in place), or `model`."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def save_merged(peft_model, output_dir: str | os.PathLike, processing_class=None) -> str:
    """The merged model (W + B A scaling in every LoRA layer, the trained `modules_to_save` in place) as a plain
    `JointEncoderModel` folder, with the tokenizer / processor. Merges a copy: `peft_model` keeps its adapter."""
    import copy

    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.save_pretrained(output_dir)
    if processing_class is not None:
        processing_class.save_pretrained(output_dir)
    logger.info(f"merged model saved in {output_dir}")
    return os.fspath(output_dir)


__all__ = [
    "ParameterAndMemoryLog",
    "TARGET_PRESETS",
    "log_parameters",
    "parameter_counts",
    "peak_memory_mib",
    "save_merged",
    "target_module_names",
    "unwrap_peft",
    "wrap_with_lora",
]
