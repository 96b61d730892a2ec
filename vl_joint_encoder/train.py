"""`vl-joint-encoder train` / `python -m vl_joint_encoder.train`: train a joint encoder as a dense retriever.

    vl-joint-encoder train config.yaml                      # or config.json: the three argument groups in one file
    vl-joint-encoder train config.yaml --resume_from_checkpoint last   # a config file, then overrides
    vl-joint-encoder train --model_name_or_path M --train_queries q.jsonl --kb kb.parquet --output_dir out ...
    accelerate launch --multi_gpu --num_processes 8 -m vl_joint_encoder.train config.yaml   # DDP, negatives shared

On CPU (tests, laptops) add `use_cpu: true`; several CPU processes need `accelerate launch --multi_gpu
--num_processes N --num_machines 1 --mixed_precision no --dynamo_backend no` AND `use_cpu: true` (gloo).
DeepSpeed / FSDP: pass `deepspeed` / `fsdp` options as with any Trainer script.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers.utils import logging


logger = logging.get_logger(__name__)


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
    columns: str = field(default="generic", metadata={"help": "column preset: generic or viquae"})
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
    eval_metrics: list[str] = field(default_factory=lambda: ["mrr@10"], metadata={"help": "ranx-style metric names"})
    on_missing_positive: str = field(default="skip", metadata={"help": "skip or error"})
    image_root: str | None = field(default=None, metadata={"help": "folder relative image paths are relative to"})
    feature_store: str | None = field(default=None, metadata={"help": ".npz/.safetensors of precomputed features"})

    def column_mapping(self):
        from .data import ColumnMapping

        if self.columns not in ("generic", "viquae"):
            raise ValueError(f"columns must be 'generic' or 'viquae', got {self.columns!r}")
        mapping = (
            ColumnMapping.viquae(self.viquae_positives, self.viquae_negatives)
            if self.columns == "viquae"
            else ColumnMapping()
        )
        overrides = {
            "query_id": self.query_id_column, "question": self.question_column, "query_image": self.query_image_column,
            "positive_ids": self.positive_ids_column, "negative_ids": self.negative_ids_column,
            "passage_id": self.passage_id_column, "passage_text": self.passage_text_column,
            "passage_title": self.passage_title_column, "passage_image": self.passage_image_column,
        }
        for name, value in overrides.items():
            if value is not None:
                setattr(mapping, name, value)
        return mapping


def parse_arguments(argv: list[str]):
    from transformers import HfArgumentParser

    from .trainer import JointEncoderTrainingArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, JointEncoderTrainingArguments))
    parser.prog = "vl-joint-encoder train"
    if argv and argv[0].endswith((".json", ".yaml", ".yml")) and not argv[0].startswith("-"):
        # a config file, then optional `--key value` overrides (e.g. `train.yaml --resume_from_checkpoint last`)
        path = os.path.abspath(argv[0])
        if not os.path.isfile(path):
            raise ValueError(f"config file {argv[0]!r} does not exist")
        if len(argv) == 1:
            return parser.parse_json_file(path) if path.endswith(".json") else parser.parse_yaml_file(path)
        with open(path) as f:
            if path.endswith(".json"):
                import json

                values = json.load(f)
            else:
                import yaml

                values = yaml.safe_load(f)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{argv[0]}: unknown argument(s) {unknown} (see vl-joint-encoder train --help)")
        for action in parser._actions:
            if action.dest in values:
                action.required = False
        parser.set_defaults(**values)
        argv = argv[1:]
    return parser.parse_args_into_dataclasses(args=argv)


def load_model_and_processing(model_args: ModelArguments):
    from transformers import AutoTokenizer

    from .bi_encoder import JointEncoderBiEncoder, is_bi_encoder_dir
    from .modeling_joint_encoder import JointEncoderModel

    path = model_args.model_name_or_path
    if is_bi_encoder_dir(path):
        model = JointEncoderBiEncoder.from_pretrained(path)
        default_processing = os.path.join(path, "query_encoder")
    else:
        model = JointEncoderModel.from_pretrained(path)
        default_processing = path
    processor_path = model_args.processor_name_or_path
    if processor_path is None and os.path.isfile(os.path.join(default_processing, "processor_config.json")):
        processor_path = default_processing
    if processor_path is not None:
        from .processing_joint_encoder import JointEncoderProcessor

        return model, JointEncoderProcessor.from_pretrained(processor_path)
    tokenizer_path = model_args.tokenizer_name_or_path or default_processing
    if not os.path.isfile(os.path.join(tokenizer_path, "tokenizer_config.json")) and os.path.isdir(path):
        tokenizer_path = path
    return model, AutoTokenizer.from_pretrained(tokenizer_path)


def _one_or_many(paths: list[str]):
    return paths if len(paths) > 1 else paths[0]


def build_evaluator(data_args: DataArguments, processing, max_length: int, feature_store=None):
    """A RetrievalEvaluator over `eval_queries` x (`eval_kb` or `kb`), qrels from the queries' positives (read with
    the same column mapping as the training data). Images are resolved as in training: files under `image_root`,
    or keys of the (already loaded) `feature_store`."""
    if not data_args.eval_queries:
        return None
    from .data import prepare_training_data
    from .evaluation import RetrievalEvaluator

    mapping = data_args.column_mapping()
    queries, kb = _one_or_many(data_args.eval_queries), _one_or_many(data_args.eval_kb or data_args.kb)
    prepared = prepare_training_data(queries, kb, mapping, on_missing_positive="skip")
    kb_ids = prepared.kb_ids
    qrels = {
        query_id: {str(kb_ids[row]) if kb_ids is not None else str(row): 1 for row in rows}
        for query_id, rows in zip(prepared.queries["query_id"], prepared.queries["positive_rows"])
    }
    return RetrievalEvaluator(
        queries, kb, processing, qrels=qrels, metrics=data_args.eval_metrics, max_length=max_length,
        query_columns={"id_column": mapping.query_id or "id", "text_column": mapping.question,
                       "image_column": mapping.query_image},
        kb_columns={"id_column": mapping.passage_id or "id", "text_column": mapping.passage_text,
                    "image_column": mapping.passage_image},
        feature_store=feature_store, image_root=data_args.image_root,
    )


def run(model_args: ModelArguments, data_args: DataArguments, training_args) -> dict:
    import transformers
    from transformers.trainer_utils import get_last_checkpoint

    from .data import load_feature_store
    from .trainer import JointEncoderTrainer

    log_level = training_args.get_process_log_level()
    logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"process {training_args.process_index} of {training_args.world_size}, device {training_args.device}")

    model, processing = load_model_and_processing(model_args)
    store = load_feature_store(data_args.feature_store) if data_args.feature_store else None
    trainer = JointEncoderTrainer(
        model=model,
        args=training_args,
        train_dataset=_one_or_many(data_args.train_queries),
        kb=_one_or_many(data_args.kb),
        processing_class=processing,
        column_mapping=data_args.column_mapping(),
        on_missing_positive=data_args.on_missing_positive,
        feature_store=store,
        image_root=data_args.image_root,
        evaluator=build_evaluator(data_args, processing, training_args.passage_max_length, store),
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
    description = (f"Queries: `{', '.join(data_args.train_queries)}`; knowledge base: `{', '.join(data_args.kb)}` "
                   f"(column preset `{data_args.columns}`).")
    hub_id = model_args.model_name_or_path if not os.path.isdir(model_args.model_name_or_path) else None
    trainer.save_final_model(results=metrics, data_description=description, base_model=hub_id)
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        model_args, data_args, training_args = parse_arguments(argv)
        run(model_args, data_args, training_args)
    except ValueError as error:
        print(f"vl-joint-encoder train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
