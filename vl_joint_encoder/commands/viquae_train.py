"""`vl-joint-encoder viquae-train`: train a joint encoder on prepared ViQuAE questions (`viquae-prepare`).

    accelerate launch --multi_gpu --num_processes 4 -m vl_joint_encoder viquae-train viquae_train.yaml

Positives and negatives come from one key: `{key}_provenance_indices` / `{key}_irrelevant_indices` (`BM25`, as the
authors train DPR; a mined key, e.g. `dense`, from `viquae-negatives`). Passages carry their article's image (or
its global vector); evaluation during training searches the KB with the `--eval_split` questions against their
provenance qrels. Every `vl-joint-encoder train` option (TrainingArguments, n_hard_negatives, grad_cache, ...) works.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

from . import ArgumentError, run_command
from .train import DataArguments, ModelArguments, build_train_parser, parse_training_command
from .viquae_common import ViquaeInputArguments, ViquaeSourceArguments


PROG = "vl-joint-encoder viquae-train"


@dataclass
class ViquaeTrainArguments:
    key: str | None = field(
        default="BM25",
        metadata={"help": "positives/negatives columns {key}_provenance_indices / {key}_irrelevant_indices ('none': "
                  "provenance_indices, in-batch negatives only)"},
    )
    train_split: str = field(default="train", metadata={"help": "split trained on"})
    eval_split: str | None = field(default=None, metadata={"help": "split evaluated during training (e.g. validation)"})
    eval_metrics: list[str] = field(
        default_factory=lambda: ["mrr@100", "precision@1", "precision@20", "hit_rate@20"],
        metadata={"help": "ranx metrics of the evaluation"},
    )
    on_missing_positive: Literal["skip", "error"] = field(default="skip", metadata={"help": "skip or error"})


def run(model_args, sources, inputs, viquae_args, training_args) -> dict:
    from ..viquae.loading import image_root, load_questions
    from ..viquae.preparation import viquae_columns
    from .train import run as train

    key = None if viquae_args.key in (None, "", "none") else viquae_args.key
    mapping = viquae_columns(key)
    splits = [viquae_args.train_split] + ([viquae_args.eval_split] if viquae_args.eval_split else [])
    questions = load_questions(sources.questions, splits)
    needed = [c for c in (mapping.positive_ids, mapping.negative_ids) if c]
    for split in splits:
        if split not in questions:
            raise ValueError(f"{sources.questions!r} has no split {split!r} (it has {sorted(questions)})")
        wanted = needed if split == viquae_args.train_split else ["provenance_indices"]
        missing = [c for c in wanted if c not in questions[split].column_names]
        if missing:
            raise ValueError(
                f"{sources.questions!r} ({split}) lacks {missing}: run viquae-prepare (BM25 key) or viquae-negatives "
                f"(a mined key) first"
            )
    viquae = inputs.build(sources, questions)
    train_queries = viquae.queries(
        questions[viquae_args.train_split], viquae_args.train_split, {c: c for c in needed}
    )
    eval_queries = None
    if viquae_args.eval_split:
        # evaluated against the provenance qrels (RetrievalEvaluator reads them from the positives column)
        eval_table = questions[viquae_args.eval_split]
        eval_queries = [viquae.queries(eval_table, viquae_args.eval_split, {mapping.positive_ids: "provenance_indices"})]
    data_args = DataArguments(
        train_queries=[train_queries], kb=[viquae.kb], query_id_column="id", question_column="input",
        query_image_column="image", positive_ids_column=mapping.positive_ids,
        negative_ids_column=mapping.negative_ids, eval_queries=eval_queries,
        eval_metrics=viquae_args.eval_metrics, on_missing_positive=viquae_args.on_missing_positive,
        image_root=image_root(sources.image_root), feature_store=viquae.feature_store,
    )  # fmt: skip
    images = "global image vectors" if viquae.feature_store is not None else "image files"
    description = (
        f"ViQuAE (`{sources.questions}`, split `{viquae_args.train_split}`), positives `{mapping.positive_ids}`, "
        f"negatives `{mapping.negative_ids}`; knowledge base `{sources.passages}` ({len(viquae.kb)} passages, "
        f"article images through `index`, {images})."
    )
    return train(model_args, data_args, training_args, data_description=description)


def full_parser():
    """The full parser (imports torch: TrainingArguments' module does)."""
    return build_train_parser(
        [("model", [ModelArguments]), ("ViQuAE sources", [ViquaeSourceArguments]),
         ("ViQuAE inputs", [ViquaeInputArguments]), ("ViQuAE training", [ViquaeTrainArguments])],
        PROG, __doc__.split("\n\n")[0],
    )  # fmt: skip


def parse(argv: list[str]):
    """`--help` and bad options are answered before torch is imported (the options table), as for `train`."""
    return parse_training_command(argv, "viquae-train", full_parser)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        arguments = parse(argv)
    except ArgumentError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return run_command(PROG, lambda: (run(*arguments), 0)[1])


__all__ = ["ViquaeTrainArguments", "main", "parse", "run"]
