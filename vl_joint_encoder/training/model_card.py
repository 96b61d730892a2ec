"""The model card of a trained retriever: facts collected from the trainer and its run, rendered from
`model_cards/trained_model_card.md` with `utils.model_cards.render_model_card`.

Every number comes from the run, not from the arguments' defaults: the steps and epochs actually trained (the
trainer state), the global batch (per-device batch x processes x accumulation), the losses logged, the data as
`prepare_training_data` found it (with the hard-negative *candidates* per query told apart from the
`n_hard_negatives` sampled per query and step), and only the arguments that differ from their defaults besides
the ones every run has.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from transformers.utils import logging

from ..retrieval.metrics import is_metric_name
from ..utils.io import atomic_path


logger = logging.get_logger(__name__)

# always shown (with their values in this run); other arguments are shown when they differ from their default
CARD_ARGUMENTS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "per_device_train_batch_size",
    "gradient_accumulation_steps", "n_hard_negatives", "query_max_length", "passage_max_length", "seed",
)
OPTIONAL_ARGUMENTS = (
    "freeze_token_embeddings", "freeze_first_n_blocks", "train_only", "separate_towers", "use_query_images",
    "use_passage_images", "grad_cache", "grad_cache_chunk_size", "gather_across_processes", "bf16", "fp16",
    "gradient_checkpointing", "max_grad_norm", "optim", "warmup_ratio", "label_smoothing_factor",
)  # fmt: skip


def data_rows(stats: dict[str, Any], n_hard_negatives: int) -> list[tuple[str, Any]]:
    """`DataStats.summary()` as labelled rows (the keys are terse: `hard_negatives_per_query_mean` counts the
    candidates a query has, not the `n_hard_negatives` drawn from them at each step)."""
    if not stats:
        return []
    rows = [
        ("queries", stats["queries"]),
        ("queries skipped (no positive)", stats["queries_skipped_without_positive"]),
        ("queries with an image", stats["queries_with_image"]),
        ("knowledge-base passages", stats["passages"]),
        ("passages with an image", stats["passages_with_image"]),
        ("relevant passages per query (mean)", f"{stats['positives_per_query_mean']:.2f}"),
        ("hard-negative candidates per query (mean)", f"{stats['hard_negatives_per_query_mean']:.2f}"),
        ("hard negatives drawn per query and step", n_hard_negatives),
    ]
    return rows


def run_facts(trainer) -> dict[str, Any]:
    """Steps, epochs, global batch and losses of the run, from the trainer state."""
    args, state = trainer.args, trainer.state
    losses = [(row["step"], row["loss"]) for row in state.log_history if "loss" in row and "step" in row]
    runtime = next((row["train_runtime"] for row in reversed(state.log_history) if "train_runtime" in row), None)
    return {
        "steps": state.global_step,
        "epochs": round(float(state.epoch or 0.0), 2),
        "processes": args.world_size,
        "global_batch": args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
        "first_loss": f"{losses[0][1]:.4f} (step {losses[0][0]})" if losses else None,
        "last_loss": f"{losses[-1][1]:.4f} (step {losses[-1][0]})" if losses else None,
        "runtime": f"{runtime:.0f} s" if runtime is not None else None,
        "device": str(args.device),
    }


def chosen_arguments(args) -> dict[str, Any]:
    """CARD_ARGUMENTS, then the OPTIONAL_ARGUMENTS whose value differs from the dataclass default."""
    defaults = {f.name: f.default for f in dataclasses.fields(type(args)) if f.default is not dataclasses.MISSING}
    chosen = {name: getattr(args, name) for name in CARD_ARGUMENTS if hasattr(args, name)}
    for name in OPTIONAL_ARGUMENTS:
        if hasattr(args, name) and name in defaults and getattr(args, name) != defaults[name]:
            chosen[name] = getattr(args, name)
    return {name: getattr(value, "value", value) for name, value in chosen.items()}  # enums as their value


def write_trained_model_card(
    trainer,
    output_dir: str,
    results: dict[str, Any],
    data_description: str = "",
    base_model: str | None = None,
    final_dir: str | None = None,
) -> str:
    """
    Write README.md (atomically) into `output_dir`; returns its path. `final_dir` is where the folder will be used
    from when it is written elsewhere first (e.g. a staging folder renamed afterwards): the card's title is its
    final name and its usage snippet loads that path.
    """
    import torch
    import transformers

    from ..bi_encoder import JointEncoderBiEncoder
    from ..utils.model_cards import render_model_card, usage_code
    from ..utils.version import __version__

    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    separate = isinstance(model, JointEncoderBiEncoder)
    final_dir = final_dir or output_dir
    name = os.path.basename(os.path.abspath(final_dir))
    config = model.query_encoder.config if separate else model.config
    if separate:
        towers = ("Separate towers: `query_encoder/` encodes questions + images, `passage_encoder/` encodes passages; "
                  "each folder loads on its own with `AutoModel.from_pretrained(..., trust_remote_code=True)`.")
    else:
        towers = "One shared tower encodes queries (question + image) and passages (text, with or without image)."
    stats = trainer.prepared_data.stats.summary() if trainer.prepared_data is not None else {}
    card_data = {"library_name": "transformers", "pipeline_tag": "feature-extraction",
                 "tags": ["vl-joint-encoder", "dense-retrieval", "vision-language", "knowledge-based-vqa"]}
    if base_model:
        card_data["base_model"] = base_model
    eval_results = _eval_results(results, dataset_name=data_description or "evaluation queries")
    if eval_results:  # the Hub reads these as `model-index` (leaderboard-style results)
        card_data["model_name"] = name
        card_data["eval_results"] = eval_results
    card = render_model_card(
        "trained_model_card",
        card_data=card_data,
        model_name=name,
        project_url="https://github.com/vl-joint-encoder/vl-joint-encoder",
        towers_description=towers,
        similarity=config.similarity,
        logit_scale=config.logit_scale,
        vision=_vision_description(config),
        data_description=data_description or "Queries and knowledge base given to `JointEncoderTrainer`.",
        data_rows=data_rows(stats, args.n_hard_negatives),
        n_hard_negatives=args.n_hard_negatives,
        gather_across_processes=(args.gather_across_processes if args.gather_across_processes is not None
                                 else f"default (on when world size > 1; here {args.world_size})"),
        grad_cache=f"{args.grad_cache} (chunk {args.grad_cache_chunk_size})" if args.grad_cache else False,
        run=run_facts(trainer),
        arguments=chosen_arguments(args),
        results={k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()},
        usage_code=usage_code(final_dir, has_tower=config.vision_config is not None, feat_dim=config.feat_dim,
                              separate_towers=separate, has_processor=_is_processor(trainer.processing_class)),
        package_version=__version__,
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
    )
    path = os.path.join(output_dir, "README.md")
    with atomic_path(path) as tmp:
        card.save(tmp)
    return path


def _is_processor(processing_class) -> bool:
    """A processor (tokenizer + image / feature handling) rather than a bare tokenizer."""
    from transformers import ProcessorMixin

    return isinstance(processing_class, ProcessorMixin)


def _vision_description(config) -> str:
    if config.vision_config is None:
        return f"precomputed {config.feat_dim}-d visual features (no tower in the model)"
    vision = config.vision_config
    kind = "SigLIP" if vision.model_type.startswith("siglip") else "CLIP"
    return (f"a frozen {kind} tower ({vision.hidden_size}-d, {vision.num_hidden_layers} layers, {vision.image_size} px "
            f"images): the processor takes photos")


def _eval_results(results: dict[str, Any], dataset_name: str) -> list:
    """Retrieval metrics (`mrr@10`, `eval_mrr@10`, `test_precision@1`, ...) as huggingface_hub EvalResults."""
    from huggingface_hub import EvalResult

    entries = []
    for key, value in results.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        split, _, metric = key.rpartition("_") if "@" in key.rpartition("_")[2] else ("", "", key)
        if not is_metric_name(metric):
            continue
        entries.append(
            EvalResult(
                task_type="text-retrieval",
                task_name="Knowledge-based visual question answering retrieval",
                dataset_type="custom",
                dataset_name=dataset_name[:80],
                dataset_split=split or "validation",
                metric_type=metric,
                metric_name=f"{metric} ({split})" if split else metric,
                metric_value=float(value),
            )
        )
    return entries


__all__ = ["chosen_arguments", "data_rows", "run_facts", "write_trained_model_card"]
