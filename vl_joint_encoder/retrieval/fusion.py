"""Late fusion of runs with ranx (`ranx.fuse`, `ranx.optimize_fusion`), plus the two steps ViQuAE's authors add.

A fused run scores each passage by combining its (normalised) scores in several runs, e.g. BM25 + a dense text run
+ image runs: the strongest published ViQuAE systems are such fusions. As the authors do (``meerqat/ir/fuse.py``,
``experiments/ir/viquae/*/config_*.json``: ``"defmin": true, "norm": "gzmuv", "method": "wsum"``):

1. ``defmin`` (`default_minimum`): a passage retrieved by some run for a question gets, in every other run that
   has results for that question, that run's lowest score for the question (not 0);
2. ``gzmuv`` (`global_zmuv`): each run's scores minus their mean, over its standard deviation (population std,
   floored at 1e-9), both computed over *all* scores of *all* questions of the run (ranx's ``zmuv`` normalises per
   question);
3. ranx's fusion method (``wsum``: weighted sum, a passage missing from a run counting 0; ``rrf``: reciprocal rank
   fusion, Cormack et al. 2009; any other ranx method), its parameters given or tuned with ranx's
   `optimize_fusion` on a validation set (for ``wsum`` a grid of weights in steps of 0.1 that sum to 1, best
   ``mrr@100`` by default, as the authors tune).

Any other ranx normalisation (``min-max``, ``zmuv``, ``max``, ``sum``, ``rank``, ``borda``) can replace ``gzmuv``.
Runs are `{query id: {passage id: score}}` dicts (`retrieval.runs`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from transformers.utils import logging

from .metrics import check_metrics


logger = logging.get_logger(__name__)

Run = dict[str, dict[str, float]]
GLOBAL_NORMS = ("gzmuv",)
RANX_NORMS = ("min-max", "max", "sum", "zmuv", "rank", "borda")


def default_minimum(runs: Sequence[Mapping[str, Mapping[str, float]]]) -> list[Run]:
    """meerqat's `default_minimum`: copies of `runs` where each question's passages (union over the runs) missing
    from a run that has results for that question get that run's minimum score for the question."""
    union: dict[str, set[str]] = {}
    for run in runs:
        for query_id, results in run.items():
            union.setdefault(query_id, set()).update(results)
    filled = []
    for run in runs:
        out = {}
        for query_id, results in run.items():
            results = dict(results)
            if results:
                minimum = min(results.values())
                for doc_id in sorted(union[query_id] - results.keys()):
                    results[doc_id] = minimum
            out[query_id] = results
        filled.append(out)
    return filled


def global_zmuv(run: Mapping[str, Mapping[str, float]]) -> Run:
    """meerqat's `gzmuv_norm`: (score - mean) / max(std, 1e-9), mean and population std over every score of the run."""
    scores = np.fromiter((s for results in run.values() for s in results.values()), dtype=np.float64)
    if scores.size == 0:
        return {query_id: {} for query_id in run}
    mean, std = float(scores.mean()), max(float(scores.std()), 1e-9)
    return {query_id: {d: (s - mean) / std for d, s in results.items()} for query_id, results in run.items()}


def _aligned(runs: Sequence[Mapping], query_ids: Sequence[str] | None) -> list[Run]:
    """Every run restricted / extended to the same questions (ranx requires equal query ids); a question a run
    does not answer gets an empty result list."""
    if query_ids is None:
        query_ids = sorted(set().union(*(run.keys() for run in runs)))
    return [{q: dict(run.get(q, {})) for q in query_ids} for run in runs]


def _prepare(runs: Sequence[Mapping], norm: str | None, defmin: bool, query_ids: Sequence[str] | None):
    if norm is not None and norm not in GLOBAL_NORMS + RANX_NORMS:
        raise ValueError(f"norm must be None or one of {GLOBAL_NORMS + RANX_NORMS}, got {norm!r}")
    if len(runs) < 2:
        raise ValueError(f"fusion needs at least two runs, got {len(runs)}")
    runs = _aligned(runs, query_ids)
    if defmin:
        runs = default_minimum(runs)
    if norm in GLOBAL_NORMS:
        runs, norm = [global_zmuv(run) for run in runs], None
    import ranx

    return [ranx.Run(run, name=f"run{position}") for position, run in enumerate(runs)], norm


def _as_dict(run) -> Run:
    """A ranx run as a dict, each question's passages by descending score (ties by passage id)."""
    return {
        q: {d: float(s) for d, s in sorted(results.items(), key=lambda item: (-item[1], item[0]))}
        for q, results in run.to_dict().items()
    }


def fuse_runs(
    runs: Sequence[Mapping[str, Mapping[str, float]]],
    method: str = "wsum",
    norm: str | None = "gzmuv",
    params: Mapping[str, Any] | None = None,
    defmin: bool = True,
    query_ids: Sequence[str] | None = None,
) -> Run:
    """The fused run (`{query: {passage: score}}`, ranked) of `runs` (see the module docstring); `params` are the
    ranx method's (``{"weights": [...]}`` for wsum, ``{"k": 60}`` for rrf)."""
    import ranx

    ranx_runs, ranx_norm = _prepare(runs, norm, defmin, query_ids)
    if method == "wsum" and (params is None or "weights" not in params):
        raise ValueError("method 'wsum' needs params={'weights': [...]}, one weight per run (or tune them)")
    if params is not None and "weights" in params and len(params["weights"]) != len(runs):
        raise ValueError(f"{len(params['weights'])} weights for {len(runs)} runs")
    return _as_dict(ranx.fuse(ranx_runs, norm=ranx_norm, method=method, params=dict(params or {})))


def tune_fusion(
    runs: Sequence[Mapping[str, Mapping[str, float]]],
    qrels: Mapping[str, Mapping[str, int]],
    method: str = "wsum",
    norm: str | None = "gzmuv",
    metric: str = "mrr@100",
    defmin: bool = True,
    step: float = 0.1,
) -> tuple[dict[str, Any], dict[str, float]]:
    """(best parameters, {parameters: metric}) of `method` on `runs` against `qrels` (ranx's `optimize_fusion`,
    over the questions of `qrels`)."""
    import ranx

    check_metrics(metric)
    query_ids = sorted(q for q, judged in qrels.items() if judged)
    if not query_ids:
        raise ValueError("tune_fusion: the qrels judge no question")
    ranx_runs, ranx_norm = _prepare(runs, norm, defmin, query_ids)
    ranx_qrels = ranx.Qrels({q: {d: int(r) for d, r in qrels[q].items()} for q in query_ids})
    kwargs = {"step": step} if method == "wsum" else {}
    best, report = ranx.optimize_fusion(
        ranx_qrels, ranx_runs, norm=ranx_norm, method=method, metric=metric, return_optimization_report=True,
        show_progress=False, **kwargs,
    )  # fmt: skip
    results = dict(zip((str(c) for c in report.configs), (float(r) for r in report.results)))
    best = {key: _plain(value) for key, value in best.items()}
    logger.info(f"fusion {method} ({norm}): best {best} ({metric} {max(results.values()):.4f} on {len(query_ids)} questions)")
    return best, results


def _plain(value):
    """numpy scalars / tuples of them (what ranx returns) as JSON-able Python values."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


__all__ = ["GLOBAL_NORMS", "RANX_NORMS", "default_minimum", "fuse_runs", "global_zmuv", "tune_fusion"]
