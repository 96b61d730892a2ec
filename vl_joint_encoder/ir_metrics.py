"""IR metrics on qrels / run dicts whose values equal ranx's, and `vl-joint-encoder evaluate`.

qrels: `{query_id: {passage_id: relevance (int)}}`; run: `{query_id: {passage_id: score}}` (ranx JSON).
Conventions, all those of `ranx.evaluate(Qrels(qrels), Run(run), metrics, make_comparable=True)` (Bassani, ECIR 2022,
https://github.com/AmenRa/ranx), so that numbers reported here and by ranx agree to the last bit:

- the mean is over the queries of the qrels (in sorted id order); a query of the qrels missing from the run scores 0;
  run queries absent from the qrels are ignored (a warning says how many);
- a passage is relevant when its relevance is >= `rel_lvl` (1 by default; `ndcg@10-l2` sets it to 2); a query with no
  relevant passage scores 0 for every metric (it is still counted in the mean);
- a run is ranked by score, descending. Equal scores keep the order ranx gives them: numba's (unstable) quicksort
  argsort of the negated scores in insertion order, applied twice (by `Run(run)` and by `make_comparable`), reproduced
  by `_ranx_argsort`. So runs with ties evaluate exactly as in ranx;
- `@k` with k = 0 (or no `@k`) means the whole run; Precision@k divides by k even when the run is shorter;
- nDCG uses Järvelin & Kekäläinen's gain (rel / log2(rank + 1)), the ideal ranking from the qrels;
- MAP@k divides by the number of relevant passages (not by min(k, R)).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping

import numpy as np


try:
    from transformers.utils import logging

    logger = logging.get_logger(__name__)
except ImportError:  # pragma: no cover - transformers is a hard dependency of the package
    import logging

    logger = logging.getLogger(__name__)

METRICS = ("mrr", "precision", "recall", "hit_rate", "ndcg", "map", "hits")
DEFAULT_METRICS = (
    "mrr@10",
    "mrr@100",
    "precision@1",
    "precision@20",
    "recall@100",
    "hit_rate@20",
    "ndcg@10",
    "map@100",
)

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]


# ------------------------------------------------------------------------------------------------ ranking like ranx
def _ranx_argsort(keys: list[float]) -> list[int]:
    """
    Argsort of `keys` (ascending) with exactly the permutation numba's `np.argsort(kind="quicksort")` returns, which is
    how ranx orders a run (argsort of the negated scores). Only the order of equal keys depends on it. Transcribed from
    numba/misc/quicksort.py (BSD-2-Clause, Anaconda Inc.): median-of-three quicksort, insertion sort below 15 items.
    """
    n = len(keys)
    order = list(range(n))
    if n < 2:
        return order

    def insertion_sort(low: int, high: int) -> None:
        for i in range(low + 1, high + 1):
            item = order[i]
            value = keys[item]
            j = i
            while j > low and value < keys[order[j - 1]]:
                order[j] = order[j - 1]
                j -= 1
            order[j] = item

    def partition(low: int, high: int) -> int:
        mid = (low + high) >> 1
        if keys[order[mid]] < keys[order[low]]:
            order[low], order[mid] = order[mid], order[low]
        if keys[order[high]] < keys[order[mid]]:
            order[high], order[mid] = order[mid], order[high]
        if keys[order[mid]] < keys[order[low]]:
            order[low], order[mid] = order[mid], order[low]
        pivot = keys[order[mid]]
        order[high], order[mid] = order[mid], order[high]
        i, j = low, high - 1
        while True:
            while i < high and keys[order[i]] < pivot:
                i += 1
            while j >= low and pivot < keys[order[j]]:
                j -= 1
            if i >= j:
                break
            order[i], order[j] = order[j], order[i]
            i += 1
            j -= 1
        order[i], order[high] = order[high], order[i]
        return i

    stack = [(0, n - 1)]
    while stack:
        low, high = stack.pop()
        while high - low >= 15:
            i = partition(low, high)
            if high - i > i - low:
                if high > i:
                    stack.append((i + 1, high))
                high = i - 1
            else:
                if i > low:
                    stack.append((low, i - 1))
                low = i + 1
        insertion_sort(low, high)
    return order


def rank_passages(passage_scores: Mapping[str, float]) -> list[str]:
    """Passage ids of one query's run, best first, ties ordered as ranx orders them."""
    ids = list(passage_scores)
    scores = np.asarray([float(passage_scores[i]) for i in ids], dtype=np.float64)  # (n,)
    if np.isnan(scores).any():
        raise ValueError("the run has NaN scores; fix the scoring before evaluating")
    if len(np.unique(scores)) == len(scores):  # no tie: every correct sort gives the same permutation
        return [ids[i] for i in np.argsort(-scores, kind="stable")]
    # ranx sorts a run when building `Run(run)` and again in `make_comparable`: two passes of the unstable argsort
    order = list(range(len(ids)))
    for _ in range(2):
        order = [order[i] for i in _ranx_argsort([-scores[j] for j in order])]
    return [ids[i] for i in order]


# ------------------------------------------------------------------------------------------------ per-query metrics
def _sequential_sum(values: np.ndarray) -> float:
    """Left-to-right float64 sum (what numba's np.sum does; numpy's pairwise sum can differ in the last bit)."""
    return float(np.cumsum(values)[-1]) if len(values) else 0.0


def _cut(k: int, length: int) -> int:
    return length if k == 0 or k > length else k


def query_metric(metric: str, relevance: Mapping[str, int], ranked: list[str], k: int = 0, rel_lvl: int = 1) -> float:
    """One query's `metric` (a name of METRICS) at cutoff `k` (0 = all) for a ranked list of passage ids."""
    relevant = {doc: int(rel) for doc, rel in relevance.items() if int(rel) >= rel_lvl}
    if not relevant:
        return 0.0
    depth = _cut(k, len(ranked))
    hit_list = np.asarray([1.0 if doc in relevant else 0.0 for doc in ranked[:depth]], dtype=np.float64)  # (depth,)
    if metric == "mrr":
        hits = np.flatnonzero(hit_list)
        return 1.0 / (hits[0] + 1) if len(hits) else 0.0
    if metric == "hits":
        return float(hit_list.sum())
    if metric == "hit_rate":
        return 1.0 if hit_list.any() else 0.0
    if metric == "precision":
        cutoff = k if k != 0 else len(ranked)
        return float(hit_list.sum()) / cutoff if cutoff else 0.0
    if metric == "recall":
        return float(hit_list.sum()) / len(relevant) if (k != 0 or len(ranked)) else 0.0
    if metric == "map":
        precisions = np.zeros(depth, dtype=np.float64)  # (depth,)
        running = np.cumsum(hit_list)
        for r in np.flatnonzero(hit_list):
            precisions[r] = running[r] / (r + 1)
        return _sequential_sum(precisions) / len(relevant)
    if metric == "ndcg":
        gains = np.asarray([float(relevant.get(doc, 0)) for doc in ranked[:depth]], dtype=np.float64)  # (depth,)
        dcg = _sequential_sum(gains / _log2_discounts(depth))
        # ideal ranking: all judged passages by relevance, descending (judged-but-irrelevant ones add 0)
        ideal_all = sorted((int(r) for r in relevance.values()), reverse=True)
        ideal_depth = _cut(k, len(ideal_all))
        ideal = np.asarray([float(r) if r >= rel_lvl else 0.0 for r in ideal_all[:ideal_depth]], dtype=np.float64)
        idcg = _sequential_sum(ideal / _log2_discounts(ideal_depth))
        return dcg / (idcg if idcg != 0.0 else 1.0)
    raise ValueError(f"unknown metric {metric!r}; supported: {', '.join(METRICS)}")


def _log2_discounts(depth: int) -> np.ndarray:
    return np.asarray([math.log2(rank + 1) for rank in range(1, depth + 1)], dtype=np.float64)  # (depth,)


# ------------------------------------------------------------------------------------------------ whole runs
def parse_metric(name: str) -> tuple[str, int, int]:
    """`"ndcg@10-l2"` -> ("ndcg", 10, 2): ranx's metric naming (metric[@k][-l<rel_lvl>])."""
    base, rel_lvl = name, 1
    if "-l" in base:
        base, level = base.split("-l", 1)
        if not level.isdigit():
            raise ValueError(f"metric {name!r}: the relevance level after '-l' must be an integer, e.g. 'ndcg@10-l2'")
        rel_lvl = int(level)
    metric, _, cutoff = base.partition("@")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {name!r}; supported: {', '.join(METRICS)} with an optional @k, e.g. mrr@100")
    if cutoff and not cutoff.isdigit():
        raise ValueError(f"metric {name!r}: the cutoff after '@' must be a non-negative integer, e.g. {metric}@10")
    return metric, int(cutoff or 0), rel_lvl


def _check_qrels(qrels: Qrels) -> None:
    if not qrels:
        raise ValueError("qrels are empty: nothing to evaluate against (expected {query_id: {passage_id: relevance}})")
    for query_id, judged in qrels.items():
        if not isinstance(judged, Mapping):
            raise ValueError(
                f"qrels[{query_id!r}] must be a dict passage_id -> relevance, got {type(judged).__name__}"
            )
        for doc, rel in judged.items():
            if isinstance(rel, bool) or not float(rel).is_integer():
                raise ValueError(
                    f"qrels[{query_id!r}][{doc!r}] = {rel!r}: relevance must be an integer (ranx convention)"
                )


def evaluate_per_query(qrels: Qrels, run: Run, metrics: str | Iterable[str]) -> dict[str, dict[str, float]]:
    """{metric: {query_id: value}} over the queries of `qrels` (sorted ids), with ranx's conventions."""
    _check_qrels(qrels)
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    parsed = {name: parse_metric(name) for name in names}
    extra = [q for q in run if q not in qrels]
    if extra:
        logger.warning(f"{len(extra)} run queries are not in the qrels and are ignored, e.g. {extra[:3]}")
    results: dict[str, dict[str, float]] = {name: {} for name in names}
    for query_id in sorted(qrels):
        ranked = rank_passages(run.get(query_id, {}))
        for name, (metric, k, rel_lvl) in parsed.items():
            results[name][query_id] = query_metric(metric, qrels[query_id], ranked, k, rel_lvl)
    return results


def evaluate(qrels: Qrels, run: Run, metrics: str | Iterable[str] = DEFAULT_METRICS) -> dict[str, float]:
    """Mean of each metric over the queries of `qrels`: equals `ranx.evaluate(..., make_comparable=True)`."""
    per_query = evaluate_per_query(qrels, run, metrics)
    # np.mean over the sorted-query array is what ranx does (pairwise summation: same bits)
    return {
        name: float(np.mean(np.asarray(list(values.values()), dtype=np.float64))) for name, values in per_query.items()
    }


def _mean_metric(metric: str, qrels: Qrels, run: Run, k: int, rel_lvl: int) -> float:
    name = f"{metric}@{k}" + (f"-l{rel_lvl}" if rel_lvl != 1 else "")
    return evaluate(qrels, run, [name])[name]


def mrr(qrels: Qrels, run: Run, k: int = 0, rel_lvl: int = 1) -> float:
    """Mean reciprocal rank of the first relevant passage within the top k (0 when none)."""
    return _mean_metric("mrr", qrels, run, k, rel_lvl)


def precision(qrels: Qrels, run: Run, k: int = 0, rel_lvl: int = 1) -> float:
    """Mean fraction of the top k that is relevant (divides by k even when fewer passages were retrieved)."""
    return _mean_metric("precision", qrels, run, k, rel_lvl)


def recall(qrels: Qrels, run: Run, k: int = 0, rel_lvl: int = 1) -> float:
    """Mean fraction of a query's relevant passages found in the top k."""
    return _mean_metric("recall", qrels, run, k, rel_lvl)


def hit_rate(qrels: Qrels, run: Run, k: int = 0, rel_lvl: int = 1) -> float:
    """Fraction of queries with at least one relevant passage in the top k (a.k.a. success@k, top-k accuracy)."""
    return _mean_metric("hit_rate", qrels, run, k, rel_lvl)


def ndcg(qrels: Qrels, run: Run, k: int = 0, rel_lvl: int = 1) -> float:
    """Mean nDCG@k, Järvelin & Kekäläinen (2002) gain rel / log2(rank + 1)."""
    return _mean_metric("ndcg", qrels, run, k, rel_lvl)


def mean_average_precision(qrels: Qrels, run: Run, k: int = 0, rel_lvl: int = 1) -> float:
    """MAP@k: mean over queries of sum(Precision@rank at each relevant rank <= k) / number of relevant passages."""
    return _mean_metric("map", qrels, run, k, rel_lvl)


# ------------------------------------------------------------------------------------------------ files
def load_run(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """A run from ranx JSON (`{query: {passage: score}}`) or a TREC run file (`qid Q0 pid rank score tag`)."""
    if str(path).endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        return {str(q): {str(d): float(s) for d, s in docs.items()} for q, docs in data.items()}
    run: dict[str, dict[str, float]] = {}
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 6:
                raise ValueError(f"{path}:{line_number}: a TREC run line has 6 fields (qid Q0 pid rank score tag)")
            run.setdefault(parts[0], {})[parts[2]] = float(parts[4])
    return run


def load_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """qrels from JSON (`{query: {passage: relevance}}`) or a TREC qrels file (`qid 0 pid relevance`)."""
    if str(path).endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        return {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in data.items()}
    qrels: dict[str, dict[str, int]] = {}
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 4:
                raise ValueError(f"{path}:{line_number}: a TREC qrels line has 4 fields (qid 0 pid relevance)")
            qrels.setdefault(parts[0], {})[parts[2]] = int(parts[3])
    return qrels


def format_table(results: Mapping[str, float], n_queries: int | None = None) -> str:
    width = max(len(name) for name in results)
    lines = [f"{'metric':<{width}}  value"] + [f"{name:<{width}}  {value:.4f}" for name, value in results.items()]
    if n_queries is not None:
        lines.append(f"({n_queries} queries)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vl-joint-encoder evaluate", description="IR metrics of a run against qrels (values equal ranx's)."
    )
    parser.add_argument("--run", required=True, help="ranx JSON run (.json) or TREC run file")
    parser.add_argument("--qrels", required=True, help="JSON qrels (.json) or TREC qrels file")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="e.g. mrr@100 precision@1 ndcg@10")
    parser.add_argument("--output", help="write {metric: value} as JSON here")
    parser.add_argument("--per-query", help="also write {metric: {query: value}} as JSON here")
    from vl_joint_encoder.cli import accept_both_spellings

    args = accept_both_spellings(parser).parse_args(argv)
    try:
        run, qrels = load_run(args.run), load_qrels(args.qrels)
        per_query = evaluate_per_query(qrels, run, args.metrics)
    except (OSError, ValueError, json.JSONDecodeError) as error:
        print(f"vl-joint-encoder evaluate: error: {error}", file=sys.stderr)
        return 2
    results = {name: float(np.mean(np.asarray(list(v.values()), dtype=np.float64))) for name, v in per_query.items()}
    missing = sum(1 for q in qrels if q not in run)
    print(format_table(results, len(qrels)))
    if missing:
        print(f"({missing} qrels queries are missing from the run and score 0)")
    for path, payload in ((args.output, results), (args.per_query, per_query)):
        if path:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump(payload, f, indent=2)
            os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
