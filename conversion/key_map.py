"""Key map from VL-T5 / VL-Adapter / T5 checkpoints to `JointEncoderModel`, with strict accounting.

Original names: j-min/VL-T5 `src/modeling_t5.py` (`VLT5` = T5ForConditionalGeneration with a `JointEncoder` as
`encoder`), ylsung/VL_adapter `VL-T5/src/modeling_t5.py` + `adapters/` (per-task `AdapterController`s named
`attn_adapter` / `ff_adapter`); see `shared/docs/vl_t5_encoder_spec.md`. Everything here is pure (no I/O), so the
map itself is unit-tested.

| source key (after `module.` is stripped)                                   | ours                               |
|----------------------------------------------------------------------------|------------------------------------|
| `shared.weight`                                                            | `shared.weight`                    |
| `encoder.X` (blocks, visual embedding, final norm)                         | `X`                                |
| `encoder.block.{i}.layer.0.attn_adapter.adapters.<task>.{down,up}_sampler.*` | `block.{i}.layer.0.adapter.*`    |
| `encoder.block.{i}.layer.1.ff_adapter.adapters.<task>.{down,up}_sampler.*`   | `block.{i}.layer.1.adapter.*`    |
| `encoder.embed_tokens.weight`, `encoder.visual_embedding.obj_order_embedding.weight` | tied to `shared.weight` |
| `decoder.embed_tokens.weight`, `lm_head.weight` (an untied T5 v1.1 `lm_head`: ignored) | tied to `shared.weight` |
| `decoder.*`, `lm_head.*`, `answer_head.*`, other tasks' adapters            | ignored                            |
| VL-T5 legacy `vis_encoder.*`                                               | renamed `encoder.*` (VL-T5 only)   |
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


SOURCES = ("vl-t5", "vl-adapter", "t5")

# Aliases of the token embedding in the original model (one tensor under five names).
ENCODER_ALIASES = ("encoder.embed_tokens.weight", "encoder.visual_embedding.obj_order_embedding.weight")
DECODER_ALIASES = ("decoder.embed_tokens.weight", "lm_head.weight")
# Explicit ignore list: everything the encoder does not use. Anything else that is not mapped is an error.
IGNORED_PREFIXES = ("decoder.", "lm_head.", "answer_head.")

ADAPTER_KEY = re.compile(r"^encoder\.block\.(\d+)\.layer\.(\d+)\.(attn_adapter|ff_adapter)\.adapters\.([^.]+)\.(.+)$")
ADAPTER_PARAMS = ("down_sampler.weight", "down_sampler.bias", "up_sampler.weight", "up_sampler.bias")

# VL-Adapter variants this converter refuses, with the key patterns that reveal them (checked in this order).
UNSUPPORTED_VARIANTS = (
    ("hyperformer (hypernetwork-generated adapters)", re.compile(r"hyper_?net|task_embedding|hypernet", re.I)),
    ("compacter (PHM / hypercomplex adapters)", re.compile(r"phm|hypercomplex", re.I)),
    ("low-rank adapters (lradapter)", re.compile(r"\.W_left$|\.W_right$|low_rank")),
    ("prompt tuning (encoder/decoder prompts)", re.compile(r"prompt", re.I)),
    ("LoRA", re.compile(r"lora", re.I)),
    (
        "a CLIP backbone inside the model (vis_encoder.*, feature_type raw)",
        re.compile(r"^vis_encoder\.(?!block\.|visual_embedding\.|final_layer_norm\.|embed_tokens\.)"),
    ),
)
VL_BART_MARKERS = re.compile(
    r"^(model\.)?(encoder|decoder)\.layers\.\d+\.|^final_logits_bias$|^model\.shared\.weight$"
)


class ConversionError(ValueError):
    """A checkpoint or option that cannot be converted; the message says what is wrong and what to do."""


@dataclass
class KeyMapping:
    """Result of mapping a source state dict: `kept` maps OUR key -> source key."""

    kept: dict[str, str] = field(default_factory=dict)
    tied: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapter_task: str | None = None

    def summary(self) -> str:
        return f"kept {len(self.kept)}, ignored {len(self.ignored)}, tied {len(self.tied)}"


def strip_prefixes(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Drop the DDP `module.` prefix; for VL-T5 only, rename the legacy `vis_encoder.` to `encoder.`."""
    out = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if source == "vl-t5" and key.startswith("vis_encoder."):
            # legacy VL-T5 files; VL-Adapter uses vis_encoder. for its CLIP backbone, so never rename there
            key = "encoder." + key[len("vis_encoder.") :]
        if key in out:
            raise ConversionError(f"key {key!r} appears twice once prefixes are stripped: the file mixes layouts")
        out[key] = value
    return out


def check_not_vl_bart(keys) -> None:
    bart = sorted(k for k in keys if VL_BART_MARKERS.search(k.removeprefix("module.")))
    if bart:
        raise ConversionError(
            f"this looks like a VL-BART checkpoint ({len(bart)} BART keys, e.g. {bart[0]!r}), not VL-T5: only the "
            f"T5-based joint encoder (VL-T5 / VL-Adapter on t5-base) can be converted"
        )


def unsupported_variants(keys) -> dict[str, list[str]]:
    """Variant name -> offending keys, for the VL-Adapter variants this converter does not support."""
    found: dict[str, list[str]] = {}
    for key in keys:
        key = key.removeprefix("module.")
        for name, pattern in UNSUPPORTED_VARIANTS:
            if pattern.search(key):
                found.setdefault(name, []).append(key)
                break
    return found


def detect_source(keys) -> str:
    """'vl-adapter' when the keys show VL-Adapter modules, else 'vl-t5'; raises on VL-BART / non-VL-T5 files."""
    keys = [k.removeprefix("module.") for k in keys]
    check_not_vl_bart(keys)
    if any(ADAPTER_KEY.match(k) or ".attn_adapter." in k or ".ff_adapter." in k for k in keys) or unsupported_variants(
        keys
    ):
        return "vl-adapter"
    has_visual = any(k.startswith(("encoder.visual_embedding.", "vis_encoder.visual_embedding.")) for k in keys)
    if has_visual:
        return "vl-t5"
    if any(k.startswith("encoder.block.") for k in keys):
        raise ConversionError(
            "the state dict has T5 encoder blocks but no visual embedding: for a text-only T5 checkpoint use "
            "--source t5 with a transformers T5 directory"
        )
    raise ConversionError(
        "the state dict has neither `encoder.block.*` nor `encoder.visual_embedding.*` keys: not VL-T5"
    )


def adapter_tasks(keys) -> list[str]:
    """Tasks that own encoder adapters (`...adapters.<task>....`), sorted."""
    return sorted({m.group(4) for k in keys if (m := ADAPTER_KEY.match(k))})


def choose_adapter_task(state: Mapping[str, torch.Tensor], requested: str | None) -> str | None:
    """
    The task whose encoder adapters are kept. None when there are no adapters. With several tasks `requested` must
    name one, unless all tasks hold identical tensors (`use_single_adapter`: one module registered under every name).
    """
    tasks = adapter_tasks(state)
    if not tasks:
        if requested is not None:
            raise ConversionError(f"--adapter-task {requested!r} given but the checkpoint has no encoder adapters")
        return None
    if requested is not None:
        if requested not in tasks:
            raise ConversionError(f"unknown adapter task {requested!r}: the checkpoint has adapters for {tasks}")
        return requested
    if len(tasks) == 1:
        return tasks[0]
    first = {
        m.group(1, 2, 3, 5): v for k, v in state.items() if (m := ADAPTER_KEY.match(k)) and m.group(4) == tasks[0]
    }
    shared = all(
        (key := m.group(1, 2, 3, 5)) in first and torch.equal(first[key], value)
        for k, value in state.items()
        if (m := ADAPTER_KEY.match(k))
    )
    if shared:
        return tasks[0]
    raise ConversionError(f"the checkpoint has separate adapters for tasks {tasks}: choose one with --adapter-task")


def map_keys(state: Mapping[str, torch.Tensor], adapter_task: str | None = None) -> KeyMapping:
    """
    Map a prefix-stripped state dict (see `strip_prefixes`) to our key names. Aliases of `shared.weight` read by the
    encoder must hold the same values (they are one tensor in the original model); decoder-side aliases are tied
    when equal and ignored otherwise (an untied T5 v1.1 `lm_head`).
    """
    mapping = KeyMapping(adapter_task=adapter_task)
    shared = state.get("shared.weight")
    for key, value in state.items():
        if key == "shared.weight":
            mapping.kept["shared.weight"] = key
        elif key in ENCODER_ALIASES or key in DECODER_ALIASES:
            same = shared is not None and value.shape == shared.shape and torch.equal(value, shared)
            if same:
                mapping.tied.append(key)
            elif key in ENCODER_ALIASES:
                if shared is None:
                    # T5 files saved without `shared.weight`: the encoder copy is the embedding
                    mapping.kept["shared.weight"] = key
                    continue
                raise ConversionError(
                    f"{key} differs from shared.weight, but the original encoder reads one tied tensor: the file is "
                    f"inconsistent (was it edited?)"
                )
            else:
                mapping.ignored.append(key)
        elif (m := ADAPTER_KEY.match(key)) is not None:
            block, layer, kind, task, param = m.groups()
            if (layer, kind) not in (("0", "attn_adapter"), ("1", "ff_adapter")) or param not in ADAPTER_PARAMS:
                mapping.unexpected.append(key)
            elif task == adapter_task:
                mapping.kept[f"block.{block}.layer.{layer}.adapter.{param}"] = key
            else:
                mapping.ignored.append(key)
        elif key.startswith(IGNORED_PREFIXES):
            mapping.ignored.append(key)
        elif key.startswith("encoder."):
            mapping.kept[key[len("encoder.") :]] = key
        else:
            mapping.unexpected.append(key)
    return mapping


def check_mapping(
    mapping: KeyMapping, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> None:
    """Raise with the full lists when anything is missing, unexpected or of the wrong shape."""
    problems = []
    missing = sorted(set(expected) - set(mapping.kept))
    unexpected = sorted(mapping.unexpected + [mapping.kept[k] for k in set(mapping.kept) - set(expected)])
    wrong = sorted(
        f"{mapping.kept[k]}: {tuple(state[mapping.kept[k]].shape)} in the checkpoint, {tuple(v.shape)} expected"
        for k, v in expected.items()
        if k in mapping.kept and tuple(state[mapping.kept[k]].shape) != tuple(v.shape)
    )
    if missing:
        problems.append(f"missing {len(missing)} key(s) (ours): {missing}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s) (not in the ignore list): {unexpected}")
    if wrong:
        problems.append(f"shape mismatch for {len(wrong)} key(s): {wrong}")
    if problems:
        raise ConversionError("the checkpoint does not map onto the joint encoder:\n  " + "\n  ".join(problems))


def to_original_layout(state: Mapping[str, torch.Tensor], task: str = "task") -> dict[str, torch.Tensor]:
    """Inverse map: OUR state dict -> original VL-T5 / VL-Adapter key names (used for T5 sources and in tests)."""
    out = {}
    for key, value in state.items():
        if key == "shared.weight" or key.startswith("projection."):
            out[key] = value
        elif ".adapter." in key:
            block, param = key.split(".adapter.")
            kind = "attn_adapter" if block.endswith("layer.0") else "ff_adapter"
            out[f"encoder.{block}.{kind}.adapters.{task}.{param}"] = value
        else:
            out["encoder." + key] = value
    return out
