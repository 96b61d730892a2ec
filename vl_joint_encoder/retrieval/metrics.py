"""IR metrics with ranx (Bassani, ECIR 2022, https://github.com/AmenRa/ranx), the library ViQuAE's authors use.

`evaluate(qrels, run, metrics)` is `ranx.evaluate(Qrels(qrels), Run(run), metrics, make_comparable=True)` with the
package's checks around it:
- the mean is over the queries of the qrels; a query of the qrels missing from the run scores 0; run queries absent
  from the qrels are ignored (a warning says how many);
- metric names are ranx's (`mrr@100`, `precision@1`, `hit_rate@20`, `ndcg@10`, `ndcg@10-l2` for relevance >= 2, ...)
  and are checked before anything is computed (`check_metrics`);
- NaN scores are refused (ranx would rank them silently).

ranx compiles its metrics with numba on first use (tens of seconds, cached on disk afterwards).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from transformers.utils import logging


logger = logging.get_logger(__name__)

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


# the names ranx's `metric_switch` accepts (ranx 0.3.x), for telling metrics from other logged values without ranx
RANX_METRICS = ("hits", "hit_rate", "precision", "recall", "f1", "r-precision", "mrr", "map", "ndcg", "ndcg_burges")


def is_metric_name(name: str) -> bool:
    """Whether `name` (e.g. `mrr@10`, `ndcg@10-l2`) names a ranx metric; cheap, for sorting logged values."""
    return name.split("-l")[0].split("@")[0] in RANX_METRICS


def _ranx():
    try:
        import ranx
    except ImportError:
        raise ImportError("retrieval metrics need ranx: pip install ranx (or 'vl-joint-encoder[eval]')") from None
    return ranx


def check_metrics(metrics: str | Iterable[str]) -> list[str]:
    """The metric names as a list, each checked with ranx's own parser (a ValueError names a bad one)."""
    from ranx.meta.evaluate import extract_metric_and_params
    from ranx.metrics import metric_switch

    names = [metrics] if isinstance(metrics, str) else list(metrics)
    if not names:
        raise ValueError("no metric given: e.g. mrr@10 precision@1")
    for name in names:
        try:
            metric, k, _ = extract_metric_and_params(name)
            metric_switch(metric)
        except (ValueError, TypeError, IndexError) as error:
            raise ValueError(
                f"unknown metric {name!r} ({error}); use ranx names with an optional @k, e.g. mrr@100, precision@1, "
                f"hit_rate@20, ndcg@10, recall@100, map@100"
            ) from None
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"metric {name!r}: the cutoff after '@' must be a non-negative integer")
    return names


def metric_cutoff(name: str) -> int:
    """The `@k` of a metric name (0 when there is none)."""
    from ranx.meta.evaluate import extract_metric_and_params

    return int(extract_metric_and_params(name)[1])


def _check(qrels: Mapping, run: Mapping) -> None:
    if not qrels:
        raise ValueError("qrels are empty: nothing to evaluate against (expected {query_id: {passage_id: relevance}})")
    for query_id, judged in qrels.items():
        if not isinstance(judged, Mapping):
            raise ValueError(f"qrels[{query_id!r}] must be a dict passage_id -> relevance, got {type(judged).__name__}")
        for doc, rel in judged.items():
            if isinstance(rel, bool) or not float(rel).is_integer():
                raise ValueError(f"qrels[{query_id!r}][{doc!r}] = {rel!r}: relevance must be an integer (ranx convention)")
    for query_id, scores in run.items():
        if not isinstance(scores, Mapping):
            raise ValueError(f"run[{query_id!r}] must be a dict passage_id -> score, got {type(scores).__name__}")
        if any(not math.isfinite(float(s)) for s in scores.values()):
            raise ValueError(f"run[{query_id!r}] has NaN or infinite scores; fix the scoring before evaluating")
    extra = [q for q in run if q not in qrels]
    if extra:
        logger.warning(f"{len(extra)} run queries are not in the qrels and are ignored, e.g. {extra[:3]}")


def _ranx_inputs(qrels: Mapping, run: Mapping):
    ranx = _ranx()
    qrels = {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in qrels.items()}
    run = {str(q): {str(d): float(s) for d, s in docs.items()} for q, docs in run.items() if str(q) in qrels}
    return ranx.Qrels(qrels), ranx.Run(run), sorted(qrels)


def evaluate_per_query(qrels: Mapping, run: Mapping, metrics: str | Iterable[str]) -> dict[str, dict[str, float]]:
    """{metric: {query_id: value}} over the queries of `qrels` (sorted ids)."""
    names = check_metrics(metrics)
    _check(qrels, run)
    ranx_qrels, ranx_run, query_ids = _ranx_inputs(qrels, run)
    scores = _ranx().evaluate(ranx_qrels, ranx_run, names, return_mean=False, make_comparable=True)
    if len(names) == 1:
        scores = {names[0]: scores}
    return {name: {q: float(v) for q, v in zip(query_ids, scores[name])} for name in names}


def evaluate(qrels: Mapping, run: Mapping, metrics: str | Iterable[str] = DEFAULT_METRICS) -> dict[str, float]:
    """Mean of each metric over the queries of `qrels`: `ranx.evaluate(..., make_comparable=True)`."""
    names = check_metrics(metrics)
    _check(qrels, run)
    ranx_qrels, ranx_run, _ = _ranx_inputs(qrels, run)
    scores = _ranx().evaluate(ranx_qrels, ranx_run, names, make_comparable=True)
    if len(names) == 1:
        scores = {names[0]: scores}
    return {name: float(scores[name]) for name in names}


def format_table(results: Mapping[str, float], n_queries: int | None = None) -> str:
    width = max(len(name) for name in results)
    lines = [f"{'metric':<{width}}  value"] + [f"{name:<{width}}  {value:.4f}" for name, value in results.items()]
    if n_queries is not None:
        lines.append(f"({n_queries} queries)")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_METRICS",
    "check_metrics",
    "evaluate",
    "evaluate_per_query",
    "format_table",
    "is_metric_name",
    "metric_cutoff",
]
