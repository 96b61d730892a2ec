"""`vl-joint-encoder evaluate`: IR metrics of a run against qrels, computed by ranx."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import command_main


DEFAULT_METRICS = ["mrr@10", "mrr@100", "precision@1", "precision@20", "recall@100", "hit_rate@20", "ndcg@10", "map@100"]


@dataclass
class EvaluateArguments:
    run: str = field(metadata={"help": "ranx JSON run (.json) or TREC run file"})
    qrels: str = field(metadata={"help": "JSON qrels (.json) or TREC qrels file"})
    metrics: list[str] = field(
        default_factory=lambda: list(DEFAULT_METRICS), metadata={"help": "ranx names, e.g. mrr@100 precision@1 ndcg@10"}
    )
    output: str | None = field(default=None, metadata={"help": "write {metric: value} as JSON here"})
    per_query: str | None = field(default=None, metadata={"help": "also write {metric: {query: value}} as JSON here"})


def evaluate(args: EvaluateArguments) -> int:
    from ..retrieval.metrics import check_metrics, evaluate_per_query, format_table
    from ..retrieval.runs import load_qrels, load_run
    from ..utils.io import write_json

    metrics = check_metrics(args.metrics)
    for path in (args.output, args.per_query):  # refuse before computing, not after printing the metrics
        if path and os.path.dirname(os.path.abspath(path)) and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"the folder of {path!r} does not exist: create it first")
    run, qrels = load_run(args.run), load_qrels(args.qrels)
    per_query = evaluate_per_query(qrels, run, metrics)
    import numpy as np

    results = {name: float(np.mean(np.asarray(list(v.values()), dtype=np.float64))) for name, v in per_query.items()}
    print(format_table(results, len(qrels)))
    missing = sum(1 for q in qrels if q not in run)
    if missing:
        print(f"({missing} qrels queries are missing from the run and score 0)")
    for path, payload in ((args.output, results), (args.per_query, per_query)):
        if path:
            write_json(path, payload)
    return 0


main = command_main("vl-joint-encoder evaluate", [EvaluateArguments], evaluate, "IR metrics of a run against qrels (ranx).")
