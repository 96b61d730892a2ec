"""`vl-joint-encoder viquae-negatives`: training columns of a key from runs (hard negatives mined with a model).

    vl-joint-encoder viquae-negatives --questions data/questions --passages P --runs train=runs/dense.train.json \\
        --key dense

Adds `{key}_provenance_indices` (retrieved passages with the original answer, else the provenance ones) and
`{key}_irrelevant_indices` to the prepared questions (`viquae-prepare`), in place (written atomically) or into
`--output`. `--guard any` (default) keeps out of the negatives every retrieved passage that contains any answer
alias (the false-negative guard); `--guard original` is the authors' rule (only the original answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from . import command_main
from .viquae_common import HUB_PASSAGES, parse_named_paths


@dataclass
class ViquaeNegativesArguments:
    questions: str = field(metadata={"help": "prepared questions (viquae-prepare's questions/ folder)"})
    runs: list[str] = field(metadata={"help": "SPLIT=RUN pairs, e.g. train=runs/dense.train.json"})
    key: str = field(metadata={"help": "column prefix, e.g. dense (-> dense_provenance_indices, ...)"})
    passages: str = field(default=HUB_PASSAGES, metadata={"help": "the passages the runs' ids are rows of"})
    guard: Literal["any", "original"] = field(default="any", metadata={"help": "what a negative must not contain"})
    negatives_order: Literal["rank", "meerqat"] = field(default="rank", metadata={"help": "rank or meerqat's set order"})
    output: str | None = field(default=None, metadata={"help": "write here instead of replacing --questions"})


def negatives(args: ViquaeNegativesArguments) -> int:
    import datasets

    from ..retrieval.runs import load_run
    from ..utils.io import atomic_path
    from ..viquae.loading import load_passages, load_questions
    from ..viquae.preparation import add_run_columns

    if not args.key.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"--key {args.key!r}: use letters, digits, '-' or '_'")
    runs = parse_named_paths(args.runs, "--runs")
    questions = load_questions(args.questions)
    missing = [split for split in runs if split not in questions]
    if missing:
        raise ValueError(f"{args.questions!r} has no split(s) {missing} (it has {sorted(questions)})")
    passages = _TextReader(load_passages(args.passages))
    out = dict(questions)
    for split, path in runs.items():
        run = load_run(path)
        bad = [d for results in run.values() for d in results if not d.isdigit() or int(d) >= len(passages.table)]
        if bad:
            raise ValueError(f"run {path!r} has passage ids that are not rows of {args.passages!r}, e.g. {bad[:3]}")
        out[split] = add_run_columns(questions[split], run, passages, args.key, args.guard, args.negatives_order)
        counts = [len(v) for v in out[split][f"{args.key}_irrelevant_indices"]]
        print(f"{split}: {len(counts)} questions, {sum(counts) / max(1, len(counts)):.1f} {args.key} negatives each")
    with atomic_path(args.output or args.questions) as tmp:
        datasets.DatasetDict(out).save_to_disk(tmp)
    print(f"-> {args.output or args.questions}")
    return 0


class _TextReader:
    """The one thing `add_run_columns` reads of the KB: stored passage texts by row."""

    def __init__(self, table):
        self.table = table

    def raw_texts(self, rows):
        from ..viquae.loading import raw_texts

        return raw_texts(self.table, rows)


main = command_main(
    "vl-joint-encoder viquae-negatives", [ViquaeNegativesArguments], negatives,
    "Positives/negatives columns of a key from runs, with the answer-matching false-negative guard.",
)
