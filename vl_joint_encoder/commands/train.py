"""`vl-joint-encoder train`: train a joint encoder as a dense retriever.

    vl-joint-encoder train config.yaml                      # or config.json: the three argument groups in one file
    vl-joint-encoder train config.yaml --resume_from_checkpoint last   # a config file, then overrides
    vl-joint-encoder train --model_name_or_path M --train_queries q.jsonl --kb kb.parquet --output_dir out ...
    accelerate launch --multi_gpu --num_processes 8 -m vl_joint_encoder train config.yaml   # DDP, negatives shared

On CPU (tests, laptops) add `use_cpu: true`; several CPU processes need `accelerate launch --multi_gpu
--num_processes N --num_machines 1 --mixed_precision no --dynamo_backend no` AND `use_cpu: true` (gloo).
DeepSpeed / FSDP: pass `deepspeed` / `fsdp` options as with any Trainer script.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Literal

from . import ArgumentError, parse_arguments, run_command


PROG = "vl-joint-encoder train"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "a saved JointEncoderModel (or separate-towers folder)"})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "default: model_name_or_path"})
    processor_name_or_path: str | None = field(
        default=None,
        metadata={"help": "a JointEncoderProcessor folder, needed for image files (default: the model folder if it has one)"},
    )


@dataclass
class DataArguments:
    train_queries: list[str] = field(metadata={"help": "query files (.jsonl/.json/.parquet) or a save_to_disk folder"})
    kb: list[str] = field(metadata={"help": "knowledge-base files or a save_to_disk folder"})
    columns: Literal["generic", "viquae"] = field(default="generic", metadata={"help": "column preset: generic or viquae"})
    viquae_positives: str = field(default="provenance_indices", metadata={"help": "viquae preset: positives column"})
    viquae_negatives: str | None = field(
        default="BM25_irrelevant_indices", metadata={"help": "viquae preset: hard negatives column"}
    )
    query_id_column: str | None = field(default=None, metadata={"help": "override the preset's query id column"})
    question_column: str | None = field(default=None, metadata={"help": "override the question column"})
    query_image_column: str | None = field(default=None, metadata={"help": "override the query image column"})
    positive_ids_column: str | None = field(default=None, metadata={"help": "override the positives column"})
    negative_ids_column: str | None = field(default=None, metadata={"help": "override the hard negatives column"})
    passage_id_column: str | None = field(default=None, metadata={"help": "override the KB id column"})
    passage_text_column: str | None = field(default=None, metadata={"help": "override the KB text column"})
    passage_title_column: str | None = field(default=None, metadata={"help": "KB title column (prepended)"})
    passage_image_column: str | None = field(default=None, metadata={"help": "override the KB image column"})
    eval_queries: list[str] | None = field(
        default=None, metadata={"help": "held-out queries for RetrievalEvaluator (with eval_strategy steps/epoch)"}
    )
    eval_kb: list[str] | None = field(default=None, metadata={"help": "KB searched at evaluation (default: kb)"})
    eval_metrics: list[str] = field(default_factory=lambda: ["mrr@10"], metadata={"help": "ranx metric names"})
    on_missing_positive: Literal["skip", "error"] = field(default="skip", metadata={"help": "skip or error"})
    image_root: str | None = field(default=None, metadata={"help": "folder relative image paths are relative to"})
    feature_store: str | None = field(
        default=None,
        metadata={"help": "precomputed features: .npz / .safetensors / .h5, or an extract-features folder"},
    )

    def column_mapping(self):
        from ..data.tables import ColumnMapping

        preset = (
            ColumnMapping.viquae(self.viquae_positives, self.viquae_negatives)
            if self.columns == "viquae"
            else ColumnMapping()
        )
        return preset.with_overrides(
            query_id=self.query_id_column, question=self.question_column, query_image=self.query_image_column,
            positive_ids=self.positive_ids_column, negative_ids=self.negative_ids_column,
            passage_id=self.passage_id_column, passage_text=self.passage_text_column,
            passage_title=self.passage_title_column, passage_image=self.passage_image_column,
        )  # fmt: skip


def parse(argv: list[str]):
    from ..training.arguments import JointEncoderTrainingArguments

    return parse_arguments([ModelArguments, DataArguments, JointEncoderTrainingArguments], argv, PROG)


def _one_or_many(paths: list[str]):
    return paths if len(paths) > 1 else paths[0]


def build_evaluator(data_args: DataArguments, processing, max_length: int, kb=None, feature_store=None):
    """A RetrievalEvaluator over `eval_queries` x (`eval_kb` or the training KB), qrels from the queries' positives
    (queries without one are not scored), with the training data's columns, images and features."""
    if not data_args.eval_queries:
        return None
    from ..data.tables import qrels_from_queries, read_knowledge_base, read_queries
    from ..retrieval.evaluator import RetrievalEvaluator

    mapping = data_args.column_mapping()
    queries = read_queries(_one_or_many(data_args.eval_queries), mapping, need_positives=True, name="eval_queries")
    kb = read_knowledge_base(_one_or_many(data_args.eval_kb) if data_args.eval_kb else kb, mapping)
    qrels = {query: relevant for query, relevant in qrels_from_queries(queries, kb).items() if relevant}
    return RetrievalEvaluator(
        queries, kb, processing, qrels=qrels, metrics=data_args.eval_metrics, max_length=max_length,
        columns=mapping, feature_store=feature_store, image_root=data_args.image_root,
    )  # fmt: skip


def run(model_args: ModelArguments, data_args: DataArguments, training_args, data_description: str | None = None) -> dict:
    """Train and save; `data_args` may also hold already-read tables / a `KnowledgeBase` / a feature store instead
    of paths (as `viquae-train` passes them), then `data_description` says what they are in the model card."""
    import transformers
    from transformers.trainer_utils import get_last_checkpoint
    from transformers.utils import logging

    from ..data.feature_stores import open_feature_store
    from ..data.tables import prepare_training_data
    from ..retrieval.embed import load_model_and_processor
    from ..training.trainer import JointEncoderTrainer

    logger = logging.get_logger("vl_joint_encoder")
    log_level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"process {training_args.process_index} of {training_args.world_size}, device {training_args.device}")

    model, processing = load_model_and_processor(
        model_args.model_name_or_path,
        processor_path=model_args.processor_name_or_path,
        tokenizer_path=model_args.tokenizer_name_or_path,
    )
    mapping = data_args.column_mapping()
    store = open_feature_store(data_args.feature_store)
    # read once: training and evaluation share the KB and the feature store
    data = prepare_training_data(
        _one_or_many(data_args.train_queries), _one_or_many(data_args.kb), mapping, data_args.on_missing_positive
    )
    trainer = JointEncoderTrainer(
        model=model,
        args=training_args,
        train_dataset=data,
        processing_class=processing,
        feature_store=store,
        image_root=data_args.image_root,
        evaluator=build_evaluator(data_args, processing, training_args.passage_max_length, data.kb, store),
    )
    resume = training_args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            raise ValueError(f"resume_from_checkpoint='last' but {training_args.output_dir!r} has no checkpoint-*")
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    if trainer.evaluator is not None:
        eval_metrics = trainer.evaluate()
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    trainer.save_state()
    description = data_description or (
        f"Queries: `{', '.join(map(str, data_args.train_queries))}`; knowledge base: "
        f"`{', '.join(map(str, data_args.kb))}` (column preset `{data_args.columns}`)."
    )
    hub_id = model_args.model_name_or_path if not os.path.isdir(model_args.model_name_or_path) else None
    trainer.save_final_model(results=metrics, data_description=description, base_model=hub_id)
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        arguments = parse(argv)
    except ArgumentError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return run_command(PROG, lambda: (run(*arguments), 0)[1])


__all__ = ["DataArguments", "ModelArguments", "build_evaluator", "main", "parse", "run"]
