"""Key maps from VL-T5 / VL-Adapter / T5 and VL-BART / VL-Adapter-BART / BART checkpoints to `JointEncoderModel`,
with strict accounting.

Original names: j-min/VL-T5 `src/modeling_t5.py` (`VLT5` = T5ForConditionalGeneration with a `JointEncoder` as
`encoder`) and `src/modeling_bart.py` (`VLBart` = BartForConditionalGeneration whose `model.encoder` is a
`JointEncoder(BartEncoder)`), ylsung/VL_adapter `VL-T5/src/modeling_t5.py` / `modeling_bart.py` + `adapters/`
(per-task `AdapterController`s named `attn_adapter` / `ff_adapter`); see `shared/docs/vl_t5_encoder_spec.md` and
`docs/vl_bart_encoder_spec.md`. Everything here is pure (no I/O), so the maps themselves are unit-tested.

T5 family (`map_keys`):

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

BART family (`map_bart_keys`):

| source key (after `module.` is stripped)                                   | ours                               |
|----------------------------------------------------------------------------|------------------------------------|
| `model.shared.weight`                                                      | `shared.weight`                    |
| `model.encoder.X` (embed_positions, layernorm_embedding, layers, visual embedding) | `X`                        |
| `model.encoder.layers.{i}.{attn,ff}_adapter.adapters.<task>.{down,up}_sampler.*` | `layers.{i}.{attn,ff}_adapter.*` |
| `model.encoder.embed_tokens.weight`, `model.encoder.visual_embedding.obj_order_embedding.weight` | tied        |
| `model.decoder.embed_tokens.weight`, `lm_head.weight`                      | tied (ignored when they differ)    |
| `final_logits_bias`, `model.decoder.*`, `answer_head.*`, other tasks' adapters, the visual norm of the layout not chosen | ignored |
| VL-BART legacy `model.vis_encoder.*`                                       | renamed `model.encoder.*` (VL-BART only) |
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)


SOURCES = ("vl-t5", "vl-adapter", "t5", "vl-bart", "vl-adapter-bart", "bart")
T5_SOURCES = ("vl-t5", "vl-adapter", "t5")
BART_SOURCES = ("vl-bart", "vl-adapter-bart", "bart")

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
    ("adapter layer norms (add_layer_norm_before/after_adapter)", re.compile(r"_adapter\.(pre|post)_layer_norm\.")),
    ("an lm-head adapter (use_lm_head_adapter)", re.compile(r"(^|\.)output_adapter\.")),
    (
        "a CLIP backbone inside the model (vis_encoder.*, feature_type raw)",
        re.compile(r"^vis_encoder\.(?!block\.|visual_embedding\.|final_layer_norm\.|embed_tokens\.)"),
    ),
)
VL_BART_MARKERS = re.compile(
    r"^(model\.)?(encoder|decoder)\.layers\.\d+\.|^final_logits_bias$|^model\.shared\.weight$"
)
VL_T5_MARKERS = re.compile(r"^(encoder|decoder|vis_encoder)\.block\.\d+\.|^shared\.weight$")

BART_ENCODER_ALIASES = ("model.encoder.embed_tokens.weight", "model.encoder.visual_embedding.obj_order_embedding.weight")
BART_DECODER_ALIASES = ("model.decoder.embed_tokens.weight", "lm_head.weight")
BART_IGNORED = ("final_logits_bias",)
BART_IGNORED_PREFIXES = ("model.decoder.", "lm_head.", "answer_head.")
BART_ADAPTER_KEY = re.compile(r"^model\.encoder\.layers\.(\d+)\.(attn_adapter|ff_adapter)\.adapters\.([^.]+)\.(.+)$")
# visual norm keys of each layout, under the encoder prefix ("encoder." for T5, "model.encoder." for BART)
VISUAL_NORM_KEYS = {
    "per-projection": ("visual_embedding.feat_embedding.1.", "visual_embedding.absolute_vis_pos_embedding.1."),
    "after-sum": ("visual_embedding.layer_norm.",),
}
VISUAL_NORM_LAYOUTS = ("per-projection", "after-sum", "none")


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
        if source == "vl-bart" and key.startswith("model.vis_encoder."):
            key = "model.encoder." + key[len("model.vis_encoder.") :]  # VL-T5's load_checkpoint does the same
        if key in out:
            raise ConversionError(f"key {key!r} appears twice once prefixes are stripped: the file mixes layouts")
        out[key] = value
    return out


def is_bart_checkpoint(keys) -> bool:
    """BART layout: `model.shared.weight`, `final_logits_bias`, `(model.)?(encoder|decoder).layers.{i}.`."""
    return any(VL_BART_MARKERS.search(k.removeprefix("module.")) for k in keys)


def check_not_vl_bart(keys) -> None:
    bart = sorted(k for k in keys if VL_BART_MARKERS.search(k.removeprefix("module.")))
    if bart:
        raise ConversionError(
            f"this looks like a VL-BART checkpoint ({len(bart)} BART keys, e.g. {bart[0]!r}), not VL-T5: convert it "
            f"with --source vl-bart (VL-Adapter on BART: --source vl-adapter-bart), or leave --source out"
        )


def check_not_vl_t5(keys) -> None:
    t5 = sorted(k for k in keys if VL_T5_MARKERS.search(k.removeprefix("module.")))
    if t5:
        raise ConversionError(
            f"this looks like a VL-T5 checkpoint ({len(t5)} T5 keys, e.g. {t5[0]!r}), not VL-BART: convert it with "
            f"--source vl-t5 (VL-Adapter on T5: --source vl-adapter), or leave --source out"
        )


def check_source_matches(keys, source: str, downsample: bool | None = None) -> None:
    """
    Refuse a `--source` the keys contradict: a file of the other backbone family; VL-Adapter modules under
    `--source vl-t5` / `vl-bart` (their adapters would be dropped or their CLIP-grid downsampling skipped); no adapter
    at all under `--source vl-adapter` / `vl-adapter-bart` (a VL-T5 / VL-BART checkpoint would get VL-Adapter's 6x6
    downsampling). A VL-Adapter *full fine-tuning* checkpoint has no adapters either: it passes when `downsample` is
    given explicitly (`--downsample` / `--no-downsample`), which says the user knows what the file is.
    """
    keys = [k.removeprefix("module.") for k in keys]
    _check_source_family(keys, source)
    if source not in ("vl-t5", "vl-adapter", "vl-bart", "vl-adapter-bart"):
        return
    detected = detect_source(keys)  # from the keys: adapters (or unsupported variants) make a VL-Adapter file
    if detected == source:
        return
    if source in ("vl-t5", "vl-bart"):
        tasks = adapter_tasks(keys) if source == "vl-t5" else bart_adapter_tasks(keys)
        raise ConversionError(
            f"--source {source} but the checkpoint holds VL-Adapter modules (adapter tasks {tasks}): it is a "
            f"{detected} checkpoint; convert it with --source {detected} --adapter-task TASK (or leave --source out)"
        )
    if downsample is None:
        raise ConversionError(
            f"--source {source} but the checkpoint has no adapter keys (`...attn_adapter.adapters.<task>...`): it "
            f"looks like a {detected} checkpoint, which --source {source} would convert with VL-Adapter's 6x6 "
            f"downsampling of the visual grid. Convert it with --source {detected} (or leave --source out); if it is a "
            f"VL-Adapter full fine-tuning checkpoint (CLIP grid features, no adapters), say so with --downsample (as "
            f"its scripts) or --no-downsample"
        )
    logger.warning(
        f"--source {source} on a checkpoint without adapters (keys of a {detected} checkpoint): converted as a "
        f"VL-Adapter full fine-tuning checkpoint, downsample={downsample}"
    )


def _check_source_family(keys: list[str], source: str) -> None:
    if source in ("vl-t5", "vl-adapter"):
        check_not_vl_bart(keys)
    elif source in ("vl-bart", "vl-adapter-bart"):
        check_not_vl_t5(keys)
        if not any(k.startswith(("model.encoder.", "model.vis_encoder.")) for k in keys):
            raise ConversionError("the state dict has no `model.encoder.*` key: not a VL-BART checkpoint")
        has_adapters = any(BART_ADAPTER_KEY.match(k) for k in keys)
        if source == "vl-bart" and has_adapters:
            raise ConversionError(
                f"the checkpoint holds VL-Adapter adapters (tasks {bart_adapter_tasks(keys)}): convert it with "
                f"--source vl-adapter-bart --adapter-task TASK"
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
    """'vl-adapter' / 'vl-adapter-bart' when the keys show VL-Adapter modules, else 'vl-t5' / 'vl-bart' (BART layers
    tell the backbone); raises on text-only or unknown files."""
    keys = [k.removeprefix("module.") for k in keys]
    if is_bart_checkpoint(keys):
        if any(BART_ADAPTER_KEY.match(k) or ".attn_adapter." in k or ".ff_adapter." in k for k in keys) or (
            unsupported_variants(keys)
        ):
            return "vl-adapter-bart"
        if any(k.startswith(("model.encoder.visual_embedding.", "model.vis_encoder.visual_embedding.")) for k in keys):
            return "vl-bart"
        raise ConversionError(
            "the state dict has BART layers but no visual embedding: for a text-only BART checkpoint use --source bart "
            "with a transformers BART directory"
        )
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
    return _choose_task(adapter_tasks(state), requested, lambda: adapters_are_shared(state, ADAPTER_KEY))


def _choose_task(tasks: list[str], requested: str | None, shared) -> str | None:
    """The adapter-task choice of both layouts; `shared()` tells whether all tasks hold the same adapters."""
    if not tasks:
        if requested is not None:
            raise ConversionError(f"--adapter-task {requested!r} given but the checkpoint has no encoder adapters")
        return None
    if requested is not None:
        if requested not in tasks:
            raise ConversionError(f"unknown adapter task {requested!r}: the checkpoint has adapters for {tasks}")
        return requested
    if len(tasks) == 1 or shared():
        return tasks[0]
    raise ConversionError(f"the checkpoint has separate adapters for tasks {tasks}: choose one with --adapter-task")


def map_keys(
    state: Mapping[str, torch.Tensor], adapter_task: str | None = None, visual_norm_layout: str | None = None
) -> KeyMapping:
    """
    Map a prefix-stripped state dict (see `strip_prefixes`) to our key names. Aliases of `shared.weight` read by the
    encoder must hold the same values (they are one tensor in the original model); decoder-side aliases are tied
    when equal and ignored otherwise (an untied T5 v1.1 `lm_head`). With `visual_norm_layout` given (a file holding
    both layouts), the other layout's norm keys are ignored.
    """
    mapping = KeyMapping(adapter_task=adapter_task)
    unused_norms = unused_visual_norm_prefixes(visual_norm_layout, "encoder.")
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
        elif key.startswith(IGNORED_PREFIXES) or (unused_norms and key.startswith(unused_norms)):
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
    not_float = sorted(
        f"{mapping.kept[k]}: {state[mapping.kept[k]].dtype}"
        for k, v in expected.items()
        if k in mapping.kept and v.is_floating_point() and not state[mapping.kept[k]].is_floating_point()
    )
    if not_float:
        problems.append(
            f"{len(not_float)} weight(s) are not floating point (a weight must be float32 / float16 / bfloat16; is this "
            f"a corrupt or re-encoded file?): {not_float}"
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


# --------------------------------------------------------------------------------------------------------- BART
def bart_adapter_tasks(keys) -> list[str]:
    """Tasks that own encoder adapters in a VL-Adapter-BART file (`...layers.{i}.attn_adapter.adapters.<task>.`)."""
    return sorted({m.group(3) for k in keys if (m := BART_ADAPTER_KEY.match(k.removeprefix("module.")))})


def adapters_are_shared(state: Mapping[str, torch.Tensor], pattern: re.Pattern = BART_ADAPTER_KEY) -> bool:
    """True when two or more tasks hold identical adapter tensors: `--use_single_adapter` registers ONE module under
    every task name (VL_adapter `adapters/adapter_controller.py` 49-58)."""
    by_task: dict[str, dict] = {}
    for key, value in state.items():
        if (m := pattern.match(key)) is not None:
            groups = m.groups()
            task, rest = (groups[2], groups[:2] + groups[3:]) if pattern is BART_ADAPTER_KEY else (
                groups[3], groups[:3] + groups[4:]
            )
            by_task.setdefault(task, {})[rest] = value
    if len(by_task) < 2:
        return False
    first = next(iter(by_task.values()))
    return all(
        tensors.keys() == first.keys() and all(torch.equal(tensors[k], first[k]) for k in first)
        for tensors in by_task.values()
    )


def choose_bart_adapter_task(state: Mapping[str, torch.Tensor], requested: str | None) -> str | None:
    """As `choose_adapter_task`, for VL-Adapter-BART's key layout."""
    return _choose_task(bart_adapter_tasks(state), requested, lambda: adapters_are_shared(state))


def visual_norm_layouts(keys, encoder_prefix: str) -> list[str]:
    """The visual norm layouts whose keys the file holds: 'per-projection' (feat_embedding.1 / absolute_vis_pos_
    embedding.1: VL-T5, VL-Adapter), 'after-sum' (visual_embedding.layer_norm: the released VL-BART files), or none."""
    keys = [k.removeprefix("module.") for k in keys]
    return [
        layout for layout, names in VISUAL_NORM_KEYS.items()
        if any(k.startswith(tuple(encoder_prefix + name for name in names)) for k in keys)
    ]


def unused_visual_norm_prefixes(layout: str | None, encoder_prefix: str) -> tuple[str, ...]:
    """Key prefixes of the norms a chosen layout does not use (ignored when a file holds both)."""
    if layout is None:
        return ()
    return tuple(encoder_prefix + name for other, names in VISUAL_NORM_KEYS.items() if other != layout for name in names)


def adapter_and_downsample_kwargs(state, adapter_key: str | None, d_model: int, downsample: bool) -> dict:
    """Config fields of the VL-Adapter options, for T5 and BART checkpoints alike: `adapter_reduction_factor` from the
    down-projection `adapter_key` (d_model / its rows), and the 7x7 -> 6x6 CLIP-grid downsampling (VL-Adapter's
    --downsample with --n_boxes 36)."""
    kwargs = {}
    if adapter_key is not None:
        rows = state[adapter_key].shape[0]
        if d_model % rows:
            raise ConversionError(f"adapters of size {rows} do not divide d_model {d_model}: not a reduction factor")
        kwargs["adapter_reduction_factor"] = d_model // rows
    if downsample:
        kwargs["visual_downsample_size"] = 6
    return kwargs


def choose_visual_norm_layout(keys, requested: str | None, encoder_prefix: str) -> str:
    """The layout read off the keys; a file with both (an older code version, cf. VL-T5 issue #25) needs it given."""
    found = visual_norm_layouts(keys, encoder_prefix)
    if requested is not None:
        if requested not in VISUAL_NORM_LAYOUTS:
            raise ConversionError(f"--visual-norm-layout must be one of {VISUAL_NORM_LAYOUTS}, got {requested!r}")
        if requested != "none" and requested not in found:
            raise ConversionError(
                f"--visual-norm-layout {requested} but the checkpoint has no such norm (it has {found or 'none'})"
            )
        return requested
    if len(found) > 1:
        raise ConversionError(
            "the checkpoint holds both visual norm layouts (visual_embedding.feat_embedding.1 / "
            "absolute_vis_pos_embedding.1 AND visual_embedding.layer_norm): the original model used only one "
            "(individual_vis_layer_norm True or False), which the weights cannot tell. Give it with "
            "--visual-norm-layout per-projection (individual_vis_layer_norm True: VL-T5, VL-Adapter) or after-sum "
            "(False: VL-BART's released scripts); the other norm's keys are then ignored"
        )
    return found[0] if found else "none"


def map_bart_keys(
    state: Mapping[str, torch.Tensor], adapter_task: str | None = None, visual_norm_layout: str | None = None
) -> KeyMapping:
    """
    Map a prefix-stripped VL-BART / VL-Adapter-BART / BART state dict to our key names. Aliases of the shared table
    read by the encoder must equal it (one tensor in the original model); decoder-side aliases are tied when equal,
    ignored otherwise. With `visual_norm_layout` given, the other layout's norm keys are ignored.
    """
    mapping = KeyMapping(adapter_task=adapter_task)
    shared = state.get("model.shared.weight")
    unused_norms = unused_visual_norm_prefixes(visual_norm_layout, "model.encoder.")
    for key, value in state.items():
        if key == "model.shared.weight":
            mapping.kept["shared.weight"] = key
        elif key in BART_ENCODER_ALIASES or key in BART_DECODER_ALIASES:
            same = shared is not None and value.shape == shared.shape and torch.equal(value, shared)
            if same:
                mapping.tied.append(key)
            elif key in BART_ENCODER_ALIASES:
                if shared is None and key == "model.encoder.embed_tokens.weight":
                    mapping.kept["shared.weight"] = key  # saved without model.shared: the encoder copy is the table
                    continue
                raise ConversionError(
                    f"{key} differs from model.shared.weight, but the original encoder reads one tied tensor: the file "
                    f"is inconsistent (was it edited?)"
                )
            else:
                mapping.ignored.append(key)
        elif (m := BART_ADAPTER_KEY.match(key)) is not None:
            layer, kind, task, param = m.groups()
            if param not in ADAPTER_PARAMS:
                mapping.unexpected.append(key)
            elif task == adapter_task:
                mapping.kept[f"layers.{layer}.{kind}.{param}"] = key
            else:
                mapping.ignored.append(key)
        elif key in BART_IGNORED or key.startswith(BART_IGNORED_PREFIXES) or (unused_norms and key.startswith(unused_norms)):
            mapping.ignored.append(key)
        elif key.startswith("model.encoder."):
            mapping.kept[key[len("model.encoder.") :]] = key
        else:
            mapping.unexpected.append(key)
    return mapping


def to_original_bart_layout(state: Mapping[str, torch.Tensor], task: str = "task") -> dict[str, torch.Tensor]:
    """Inverse map: OUR state dict (backbone bart) -> original VL-BART / VL-Adapter-BART key names."""
    out = {}
    for key, value in state.items():
        if key == "shared.weight":
            out["model.shared.weight"] = value
        elif key.startswith("projection."):
            out[key] = value
        elif (m := re.match(r"^layers\.(\d+)\.(attn_adapter|ff_adapter)\.(.+)$", key)) is not None:
            out[f"model.encoder.layers.{m.group(1)}.{m.group(2)}.adapters.{task}.{m.group(3)}"] = value
        else:
            out["model.encoder." + key] = value
    return out
