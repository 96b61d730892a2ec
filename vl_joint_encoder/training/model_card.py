"""The model card of a trained retriever: facts collected from the trainer, rendered from
`model_cards/trained_model_card.md` with `model_card.render_model_card`."""

from __future__ import annotations

import os
from typing import Any

from transformers.utils import logging

from ..retrieval.metrics import is_metric_name
from ..utils.io import atomic_path


logger = logging.get_logger(__name__)

CARD_ARGUMENTS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "n_hard_negatives", "query_max_length", "passage_max_length", "warmup_steps", "weight_decay", "seed",
    "freeze_token_embeddings", "freeze_first_n_blocks", "train_only", "separate_towers", "use_query_images",
    "use_passage_images",
)


def write_trained_model_card(
    trainer, output_dir: str, results: dict[str, Any], data_description: str = "", base_model: str | None = None
) -> str:
    """Write README.md (atomically) into `output_dir`; returns its path."""
    import torch
    import transformers

    from ..bi_encoder import JointEncoderBiEncoder
    from ..utils.model_cards import render_model_card
    from ..utils.version import __version__

    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    separate = isinstance(model, JointEncoderBiEncoder)
    if separate:
        towers = ("Separate towers: `query_encoder/` encodes questions + images, `passage_encoder/` encodes passages; "
                  "each folder loads on its own with `AutoModel.from_pretrained(..., trust_remote_code=True)`.")
        usage = ('query_encoder = AutoModel.from_pretrained("MODEL/query_encoder", trust_remote_code=True)\n'
                 'passage_encoder = AutoModel.from_pretrained("MODEL/passage_encoder", trust_remote_code=True)')
    else:
        towers = "One shared tower encodes queries (question + image) and passages (text, with or without image)."
        usage = 'model = AutoModel.from_pretrained("MODEL", trust_remote_code=True)\nembedding = model(**inputs).pooler_output'
    stats = trainer.prepared_data.stats.summary() if trainer.prepared_data is not None else {}
    card_data = {"library_name": "transformers", "pipeline_tag": "feature-extraction",
                 "tags": ["vl-joint-encoder", "dense-retrieval", "vision-language", "knowledge-based-vqa"]}
    if base_model:
        card_data["base_model"] = base_model
    eval_results = _eval_results(results, dataset_name=data_description or "evaluation queries")
    if eval_results:  # the Hub reads these as `model-index` (leaderboard-style results)
        card_data["model_name"] = os.path.basename(os.path.abspath(output_dir))
        card_data["eval_results"] = eval_results
    card = render_model_card(
        "trained_model_card",
        card_data=card_data,
        model_name=os.path.basename(os.path.abspath(output_dir)),
        project_url="https://github.com/vl-joint-encoder/vl-joint-encoder",
        towers_description=towers,
        similarity=model.config.similarity,
        logit_scale=model.config.logit_scale,
        data_description=data_description or "Queries and knowledge base given to `JointEncoderTrainer`.",
        data_stats=stats,
        n_hard_negatives=args.n_hard_negatives,
        gather_across_processes=(args.gather_across_processes if args.gather_across_processes is not None
                                 else f"default (on when world size > 1; here {args.world_size})"),
        grad_cache=f"{args.grad_cache} (chunk {args.grad_cache_chunk_size})" if args.grad_cache else False,
        arguments={name: getattr(args, name) for name in CARD_ARGUMENTS},
        results={k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()},
        usage_code=usage,
        package_version=__version__,
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
    )
    path = os.path.join(output_dir, "README.md")
    with atomic_path(path) as tmp:
        card.save(tmp)
    return path


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


__all__ = ["write_trained_model_card"]
