"""Evaluation as ViQuAE's authors do it (``meerqat/ir/search.py:441-457``, ``meerqat/ir/metrics.py``): relevance
extended by answer matching on every retrieved passage, qrels fused across systems, ranx metrics.

For each system's run, every retrieved passage not judged yet is tested with the question's answers (any alias)
and added to the qrels when it contains one. ``qrels="fused"`` (the authors' comparison, ``all_qrels.json``)
scores every system against the union of all systems' judgments; ``"per-system"`` scores each against its own
extension only. For ``mrr``, ``precision`` and ``hit_rate`` both give the same numbers, since a retrieved passage
is judged by its own text whatever the other runs; recall-like metrics differ (the authors discourage them:
"the number of relevant documents will depend on the systems you use", EXPERIMENTS.rst:596-599).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..retrieval.metrics import evaluate
from .relevance import AnswerMatcher, extend_qrels, fuse_qrels


DEFAULT_METRICS = ("mrr@100", "precision@1", "precision@20", "hit_rate@20")
QRELS_MODES = ("fused", "per-system")


def extended_qrels(
    runs: Mapping[str, Mapping[str, Mapping[str, float]]],
    matchers: Mapping[str, AnswerMatcher],
    passage_texts,
    base_qrels: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[str, dict[str, dict[str, int]]]:
    """`{system: qrels}`: `base_qrels` (e.g. the provenance qrels) extended with the passages of that system's run
    that contain an answer. `passage_texts(rows) -> texts` reads the stored passages (one batch per question)."""
    out = {}
    for system, run in runs.items():
        qrels = {q: dict(judged) for q, judged in (base_qrels or {}).items()}
        for query_id in run:
            qrels.setdefault(query_id, {})
        texts = _prefetch(run, passage_texts)
        extend_qrels({q: r for q, r in run.items() if q in matchers}, matchers, texts.__getitem__, qrels, {})
        out[system] = {q: {d: r for d, r in judged.items() if r > 0} for q, judged in qrels.items()}
    return out


def _prefetch(run: Mapping[str, Mapping[str, float]], passage_texts) -> dict[int, str]:
    rows = sorted({int(d) for results in run.values() for d in results})
    return dict(zip(rows, passage_texts(rows)))


def evaluate_systems(
    runs: Mapping[str, Mapping[str, Mapping[str, float]]],
    matchers: Mapping[str, AnswerMatcher],
    passage_texts,
    base_qrels: Mapping[str, Mapping[str, int]] | None = None,
    metrics=DEFAULT_METRICS,
    qrels: str = "fused",
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    """(`{system: {metric: value}}`, the qrels used) over the questions of `matchers` (a question missing from a
    run scores 0 there). With ``qrels="per-system"`` the returned qrels are the fused ones, for reference."""
    if qrels not in QRELS_MODES:
        raise ValueError(f"qrels must be one of {QRELS_MODES}, got {qrels!r}")
    per_system = extended_qrels(runs, matchers, passage_texts, base_qrels)
    fused = fuse_qrels(per_system.values())
    results = {}
    for system, run in runs.items():
        judged = fused if qrels == "fused" else per_system[system]
        judged = {q: judged.get(q, {}) for q in matchers}
        results[system] = evaluate(judged, {q: run.get(q, {}) for q in matchers}, list(metrics))
    return results, {q: fused.get(q, {}) for q in matchers}


def format_metrics_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table, one system per row."""
    metrics = list(next(iter(results.values())))
    width = max(len(s) for s in results)
    lines = [f"{'system':<{width}}  " + "  ".join(f"{m:>12}" for m in metrics)]
    lines += [f"{s:<{width}}  " + "  ".join(f"{values[m]:>12.4f}" for m in metrics) for s, values in results.items()]
    return "\n".join(lines)


__all__ = ["DEFAULT_METRICS", "QRELS_MODES", "evaluate_systems", "extended_qrels", "format_metrics_table"]
