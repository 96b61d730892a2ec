"""The text prefix each source task was trained with, from the original data loaders: the converter records it in the
config (`text_prefix`) and the model card, and the processor prepends it.

- VL-T5 / VL-BART (j-min/VL-T5 a07d779, `VL-T5/src/*_data.py`): `tokenizer.encode(f"vqa: {sent}")` (vqa_data.py:182),
  `f"gqa: {sent}"` (gqa_data.py:177), `f"nlvr: {sent}"` (nlvr_data.py:156), `"caption:"` joined by a space with
  what follows (caption_data.py:209, 229), `f"visual grounding: {sent}"` (refcoco_data.py:230-232),
  `"translate English to German:"` joined by a space (mmt_data.py:185-196). The same loaders serve both backbones.
- VL-Adapter (ylsung/VL_adapter 545fcbb): every image script runs `multitask.py`, whose loaders encode
  `f"{prompt}{sent}{post_prompt}"` (vqa_clip_data.py:200 ...) with `prompt` set per task ONLY with
  `--use_tasks_prompts` (multitask.py:1079-1096): `vqa: `, `gpa: ` (sic, for GQA), `nlvr: `, `caption: `,
  `visual grounding: `, `translate English to German: `, `cls: `, VCR none; otherwise every prompt is `""`.
  `--use_tasks_prompts` is passed by single_adapter.sh / single_compacter.sh / single_lora.sh / single_prompt.sh,
  not by multiple_adapters.sh nor full_finetuning.sh. So a VL-Adapter file whose adapters are one module shared by
  every task (single_adapter.sh) was trained with the task prompt, and a file with separate adapters
  (multiple_adapters.sh) or none (full_finetuning.sh) with no prefix. This is read off the file; `--text-prefix`
  overrides it.
"""

from __future__ import annotations

from transformers.utils import logging

from conversion.key_map import ConversionError


logger = logging.get_logger(__name__)

VL_T5_TASK_PREFIXES = {
    "vqa": "vqa: ",
    "gqa": "gqa: ",
    "nlvr": "nlvr: ",
    "caption": "caption: ",
    "refcoco": "visual grounding: ",
    "mmt": "translate English to German: ",
}
VL_ADAPTER_TASK_PROMPTS = {
    "vqa": "vqa: ",
    "gqa": "gpa: ",  # sic: multitask.py:1081; the checkpoints were trained with it
    "nlvr": "nlvr: ",
    "refcoco": "visual grounding: ",
    "vcr": "",
    "caption": "caption: ",
    "mmt": "translate English to German: ",
    "cls": "cls: ",
}


def resolve_text_prefix(
    source: str,
    task: str | None,
    adapter_task: str | None,
    single_adapter: bool,
    explicit: str | None = None,
) -> str | None:
    """
    The prefix to record: `explicit` (`--text-prefix`) when given; else for VL-Adapter sources the prompt of
    `adapter_task` (or `task`) if the adapters are shared (single_adapter.sh, `--use_tasks_prompts`), `""` if not;
    for VL-T5 / VL-BART the loaders' prefix of `task` (`--task`); None when no task is known (T5 / BART sources, or
    no `--task`).
    """
    if explicit is not None:
        return explicit
    vl_adapter = source in ("vl-adapter", "vl-adapter-bart")
    if vl_adapter:
        task = task if task is not None else adapter_task
    if task is None:
        return "" if vl_adapter else None
    table = VL_ADAPTER_TASK_PROMPTS if vl_adapter else VL_T5_TASK_PREFIXES
    if task not in table:
        raise ConversionError(
            f"no known text prefix for task {task!r} in the {'VL-Adapter' if vl_adapter else 'VL-T5'} loaders (known: "
            f"{sorted(table)}): give it with --text-prefix (\"\" for none)"
        )
    if vl_adapter and not single_adapter:
        logger.info(
            "VL-Adapter checkpoint with separate adapters per task (multiple_adapters.sh) or none: its scripts run "
            "without --use_tasks_prompts, so the task had no text prefix; pass --text-prefix to override"
        )
        return ""
    return table[task]


__all__ = ["VL_ADAPTER_TASK_PROMPTS", "VL_T5_TASK_PREFIXES", "resolve_text_prefix"]
