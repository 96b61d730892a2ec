"""`vl-joint-encoder viquae-evaluate`: the metric table of several runs, as ViQuAE's authors compute it.

    vl-joint-encoder viquae-evaluate --questions data/questions --split test --passages P \\
        --runs bm25=runs/bm25.test.json dense=runs/dense.test.json fused=runs/fused.test.json --output metrics.json

Relevance is the provenance qrels (`provenance_indices`) extended by answer matching on every passage each run
retrieved, fused across the runs (`--qrels per-system`: each run's own extension); metrics by ranx. Writes
`{system: {metric: value}}` to `--output` and the qrels used to `--qrels_output`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from . import command_main
from .viquae_common import HUB_PASSAGES, parse_named_paths


@dataclass
class ViquaeEvaluateArguments:
    questions: str = field(metadata={"help": "prepared questions (viquae-prepare's questions/ folder)"})
    runs: list[str] = field(metadata={"help": "SYSTEM=RUN pairs (ranx JSON or TREC), passage rows as ids"})
    split: str = field(default="test", metadata={"help": "question split the runs answer"})
    passages: str = field(default=HUB_PASSAGES, metadata={"help": "the passages the runs' ids are rows of"})
    metrics: list[str] = field(
        default_factory=lambda: ["mrr@100", "precision@1", "precision@20", "hit_rate@20"],
        metadata={"help": "ranx metric names (the authors' defaults)"},
    )
    qrels: Literal["fused", "per-system"] = field(default="fused", metadata={"help": "qrels fused across runs or not"})
    base_qrels: str | None = field(
        default="provenance_indices",
        metadata={"help": "question column of the relevance to extend ('none': start from empty qrels, as meerqat)"},
    )
    output: str | None = field(default=None, metadata={"help": "write {system: {metric: value}} as JSON here"})
    qrels_output: str | None = field(default=None, metadata={"help": "write the (fused) extended qrels here"})


def evaluate(args: ViquaeEvaluateArguments) -> int:
    from ..data.tables import column_values
    from ..retrieval.metrics import check_metrics
    from ..retrieval.runs import load_run
    from ..utils.io import write_json
    from ..viquae.evaluation import evaluate_systems, format_metrics_table
    from ..viquae.loading import load_passages, load_questions, raw_texts
    from ..viquae.preparation import matchers, qrels_from_column

    metrics = check_metrics(args.metrics)
    paths = parse_named_paths(args.runs, "--runs")
    questions = load_questions(args.questions, [args.split])
    if args.split not in questions:
        raise ValueError(f"{args.questions!r} has no split {args.split!r} (it has {sorted(questions)})")
    table = questions[args.split]
    base = None
    if args.base_qrels not in (None, "", "none"):
        if args.base_qrels not in table.column_names:
            raise ValueError(f"the questions have no column {args.base_qrels!r}: run viquae-prepare first")
        base = qrels_from_column(table, args.base_qrels)
    passages = load_passages(args.passages)
    runs = {}
    for system, path in paths.items():
        run = load_run(path)
        bad = [d for results in run.values() for d in results if not d.isdigit() or int(d) >= len(passages)]
        if bad:
            raise ValueError(f"run {path!r} ({system}) has ids that are not passage rows of {args.passages!r}: {bad[:3]}")
        known = set(column_values(table, "id"))
        unknown = [q for q in run if q not in known]
        if len(unknown) == len(run):
            raise ValueError(f"run {path!r} ({system}) answers none of the {args.split} questions")
        runs[system] = run
    results, qrels = evaluate_systems(
        runs, matchers(table), lambda rows: raw_texts(passages, rows), base, metrics, args.qrels
    )
    print(format_metrics_table(results))
    n = sum(len(judged) for judged in qrels.values())
    print(f"({len(qrels)} {args.split} questions, {n / max(1, len(qrels)):.1f} relevant passages each, {args.qrels} qrels)")
    if args.output:
        write_json(args.output, results)
    if args.qrels_output:
        write_json(args.qrels_output, qrels, indent=None)
    return 0


main = command_main(
    "vl-joint-encoder viquae-evaluate", [ViquaeEvaluateArguments], evaluate,
    "Metric table of runs on answer-extended (fused) qrels, as ViQuAE's authors evaluate.",
)
