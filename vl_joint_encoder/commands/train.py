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

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

from . import (
    ArgumentError,
    HelpFormatter,
    apply_config_file,
    build_parser,
    parse_arguments,
    run_command,
    setup_logging,
)


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


DESCRIPTION = (
    "Train a joint encoder as a dense retriever with transformers' Trainer (under `accelerate launch` for several "
    "processes). Options come from a YAML / JSON config file (keys = option names), then the command line. The "
    "package's options are listed first; every transformers TrainingArguments option follows."
)
# Trainer logs (and this command prints) the loss every `logging_steps` steps. TrainingArguments' default, 500,
# prints nothing in a short run; 10 shows progress from the first minutes of any run.
DEFAULT_LOGGING_STEPS = 10
TRAINING_ARGUMENTS_TITLE = "TrainingArguments (transformers)"


def _own_training_fields() -> set[str]:
    """Fields JointEncoderTrainingArguments adds to (or redefines in) TrainingArguments."""
    import dataclasses

    from transformers import TrainingArguments

    from ..training.arguments import JointEncoderTrainingArguments

    inherited = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    return {
        f.name
        for f in dataclasses.fields(JointEncoderTrainingArguments)
        if f.name not in inherited or f.metadata.get("help") != inherited[f.name].metadata.get("help")
    }


def build_train_parser(groups=None, prog: str = PROG, description: str | None = None):
    """The full parser of a training command: its own option groups (default: `train`'s model and data options), the
    package's training options, then TrainingArguments' (imports torch: TrainingArguments' module does)."""
    from ..training.arguments import JointEncoderTrainingArguments

    groups = groups or [("model", [ModelArguments]), ("data", [DataArguments])]
    own = _own_training_fields()
    parser = build_parser(
        [dtype for _, types_ in groups for dtype in types_] + [JointEncoderTrainingArguments],
        prog,
        description or DESCRIPTION,
        groups=[(title, types_, None) for title, types_ in groups] + [
            ("retrieval training (vl-joint-encoder)", [JointEncoderTrainingArguments], lambda f: f.name in own),
            (TRAINING_ARGUMENTS_TITLE, [JointEncoderTrainingArguments], lambda f: f.name not in own),
        ],
    )
    parser.set_defaults(logging_steps=DEFAULT_LOGGING_STEPS)
    return parser


# `--help` and argument errors without torch: the parser's options as a table (option strings, nargs, choices,
# defaults, help; no types), written by `python -m vl_joint_encoder.commands.train --write-options-table` and checked
# against the real parser by tests/test_cli.py. It is used only with the transformers version and the option files
# it was written from (`options_key`); otherwise the real parser alone answers (after importing torch).
OPTIONS_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_options.json")
_ACTION_FIELDS = ("option_strings", "dest", "nargs", "const", "default", "choices", "required", "help", "metavar")


# the files that define the training commands' options besides transformers: a table written before one of them
# changed is stale
OPTION_SOURCES = ("commands/train.py", "commands/__init__.py", "training/arguments.py", "training/freezing.py",
                  "commands/viquae_train.py", "commands/viquae_common.py")  # fmt: skip
# the commands built on build_train_parser (each module has `full_parser()`), one table each
TABLE_COMMANDS = ("train", "viquae-train")


def options_key() -> dict:
    """What the table depends on: the installed transformers, and the package's option-defining files."""
    import hashlib
    from importlib.metadata import version

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for name in OPTION_SOURCES:
        with open(os.path.join(package, name), "rb") as handle:
            digest.update(handle.read())
    return {"transformers": version("transformers"), "sources_sha256": digest.hexdigest()}


def full_parser():
    """`train`'s full parser."""
    return build_train_parser()


def options_tables() -> dict:
    """The options table of every command in TABLE_COMMANDS, by command, with the key they were written for."""
    from . import command_module

    return {**options_key(), "commands": {name: options_table(command_module(name).full_parser())
                                          for name in TABLE_COMMANDS}}  # fmt: skip


def options_table(parser=None) -> dict:
    """The table of `parser` (default: the full train parser), JSON-serialisable."""
    parser = parser or build_train_parser()
    groups = []
    for group in parser._action_groups:
        actions = []
        for action in group._group_actions:
            if isinstance(action, argparse._HelpAction):
                continue
            entry = {name: getattr(action, name) for name in _ACTION_FIELDS}
            entry["choices"] = list(entry["choices"]) if entry["choices"] is not None else None
            entry["store_false"] = isinstance(action, argparse._StoreFalseAction)
            actions.append(entry)
        groups.append({"title": group.title, "actions": actions})
    return {"prog": parser.prog, "description": parser.description, "usage": parser.usage, "groups": groups}


def parser_from_table(table: dict) -> argparse.ArgumentParser:
    """A parser with the same options, help and checks (names, choices, required) as the real one, minus the value
    types (the real parser converts and checks those after torch is loaded)."""
    parser = argparse.ArgumentParser(prog=table["prog"], description=table["description"], usage=table["usage"],
                                     formatter_class=HelpFormatter)  # fmt: skip
    titles = {group.title: group for group in parser._action_groups}
    for group_entry in table["groups"]:
        group = titles.get(group_entry["title"]) or parser.add_argument_group(group_entry["title"])
        for entry in group_entry["actions"]:
            kwargs = {k: entry[k] for k in ("dest", "default", "required", "help")}
            if entry["store_false"]:
                group.add_argument(*entry["option_strings"], action="store_false", **kwargs)
                continue
            kwargs.update({k: entry[k] for k in ("nargs", "const", "choices", "metavar") if entry[k] is not None})
            group.add_argument(*entry["option_strings"], **kwargs)
    return parser


def fast_parser(command: str = "train") -> argparse.ArgumentParser | None:
    """`command`'s parser from the options table if the table was written for the installed transformers and the
    package's current option files (`options_key`); else None (then the real parser answers, after importing
    torch)."""
    import json

    try:
        with open(OPTIONS_TABLE, encoding="utf-8") as handle:
            tables = json.load(handle)
    except (OSError, ValueError):
        return None
    key = options_key()
    if not all(tables.get(name) == value for name, value in key.items()) or command not in tables.get("commands", {}):
        return None
    return parser_from_table(tables["commands"][command])


def parse_training_command(argv: list[str], command: str, build) -> list:
    """Parse a training command's `argv`. `--help` and bad options (unknown, missing, not a choice, unknown config
    keys) are answered from the options table before torch is imported; then the real parser (`build()`) builds the
    dataclasses."""
    argv = list(argv)
    prog = f"vl-joint-encoder {command}"
    light = fast_parser(command)
    if light is not None:
        light.parse_args(apply_config_file(light, argv, prog))  # exits on --help or a bad option
    return parse_arguments([], argv, prog, parser=build())


def parse(argv: list[str]):
    """Parse `train`'s `argv` (see parse_training_command)."""
    return parse_training_command(argv, "train", build_train_parser)


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
    from transformers.utils import logging

    from ..data.feature_stores import open_feature_store
    from ..data.tables import prepare_training_data
    from ..retrieval.embed import load_model_and_processor
    from ..training.trainer import JointEncoderTrainer

    logger = logging.get_logger(__name__)
    setup_logging(training_args.get_process_log_level())  # log_level / log_level_replica apply to the package too
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
    from ..training.lora import ParameterAndMemoryLog

    trainer.add_callback(ParameterAndMemoryLog())  # trainable parameters and memory in the log
    # "last": the newest COMPLETE checkpoint; a named one is verified; a finished run is refused (training/checkpoints.py)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
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
    if training_args.lora_merge and training_args.should_save:
        from ..training.lora import save_merged

        save_merged(trainer.accelerator.unwrap_model(trainer.model), os.path.join(training_args.output_dir, "merged"),
                    processing)  # fmt: skip
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--write-options-table"]:  # maintainers: after a transformers upgrade or a new option
        from ..utils.io import write_json

        write_json(OPTIONS_TABLE, options_tables())
        print(f"wrote {OPTIONS_TABLE}")
        return 0
    try:
        arguments = parse(argv)
    except ArgumentError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return run_command(PROG, lambda: (run(*arguments), 0)[1])


__all__ = ["DataArguments", "ModelArguments", "build_evaluator", "main", "parse", "run"]


if __name__ == "__main__":
    sys.exit(main())
