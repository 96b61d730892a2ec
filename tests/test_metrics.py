"""Metrics: ranx through `retrieval.metrics` (hand-computed values, the package's conventions: missing run queries
score 0, extra ones are ignored, queries without relevant passage count as 0), the evaluate command and module."""

import json
import random

import numpy as np
import pytest

from vl_joint_encoder.commands import evaluate as evaluate_command
from vl_joint_encoder.retrieval import metrics


METRICS = [
    "mrr", "mrr@1", "mrr@10", "precision@1", "precision@5", "precision@50", "precision", "recall@3", "recall",
    "hit_rate@1", "hit_rate@20", "ndcg@5", "ndcg", "ndcg@10-l2", "map@5", "map", "hits@10", "map@10-l2",
]  # fmt: skip


@pytest.fixture(scope="module")
def ranx_evaluate():
    """ranx compiles its metrics with numba on first use (~30 s): once per module."""
    ranx = pytest.importorskip("ranx")

    def run_ranx(qrels, run, metrics):
        out = ranx.evaluate(ranx.Qrels(qrels), ranx.Run(run), metrics, make_comparable=True)
        return {metrics[0]: out} if len(metrics) == 1 else out

    run_ranx({"q": {"d": 1}, "r": {"e": 1}}, {"q": {"d": 1.0}}, METRICS)
    return run_ranx


def random_case(seed, n_queries=40, n_docs=60):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(n_docs)]
    qrels, run = {}, {}
    for q in range(n_queries):
        qid = f"q{q:02d}"
        kind = rng.random()
        if kind < 0.1:
            qrels[qid] = {rng.choice(docs): 0}  # judged, nothing relevant
        else:
            qrels[qid] = {d: rng.choice([0, 1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 8))}
        if rng.random() < 0.15:
            continue  # query missing from the run
        length = rng.choice([0, 1, 5, 14, 15, 16, 30, 45])
        if rng.random() < 0.5:  # heavy ties: a handful of distinct scores, > 15 items exercises quicksort partitions
            scores = [float(rng.randint(0, 3)) for _ in range(length)]
        else:
            scores = [rng.random() for _ in range(length)]
        run[qid] = dict(zip(rng.sample(docs, length), scores))
    run["not_in_qrels"] = {"d0": 1.0}
    return qrels, run


@pytest.mark.parametrize("seed", range(2))
def test_conventions_on_random_runs(ranx_evaluate, seed):
    """The wrapper's conventions equal ranx's own make_comparable: queries missing from the run score 0, run queries
    absent from the qrels are ignored, judged-but-irrelevant queries count as 0."""
    qrels, run = random_case(seed)
    expected = ranx_evaluate(qrels, run, METRICS)
    got = metrics.evaluate(qrels, run, METRICS)
    for name in METRICS:
        assert got[name] == float(expected[name]), (name, got[name], expected[name])
    per_query = metrics.evaluate_per_query(qrels, run, ["mrr@10"])["mrr@10"]
    assert sorted(per_query) == sorted(qrels)
    assert all(per_query[q] == 0.0 for q in qrels if q not in run)


def test_hand_computed_values():
    qrels = {"q1": {"a": 1, "b": 2}, "q2": {"c": 0}, "q3": {"a": 1}}
    run = {"q1": {"x": 0.9, "b": 0.8, "a": 0.1}, "q2": {"c": 1.0}}  # q3 missing: scores 0
    names = ["mrr@10", "precision@2", "recall@3", "hit_rate@1", "map@3", "ndcg@3"]
    got = metrics.evaluate(qrels, run, names)
    assert got["mrr@10"] == pytest.approx((1 / 2) / 3)
    assert got["precision@2"] == pytest.approx((1 / 2) / 3)
    assert got["recall@3"] == pytest.approx(1 / 3)
    assert got["hit_rate@1"] == 0.0
    assert got["map@3"] == pytest.approx(((1 / 2 + 2 / 3) / 2) / 3)
    dcg = 2 / np.log2(3) + 1 / np.log2(4)
    idcg = 2 / np.log2(2) + 1 / np.log2(3)
    assert got["ndcg@3"] == pytest.approx((dcg / idcg) / 3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown metric 'mrr10'"):
        metrics.evaluate({"q": {"d": 1}}, {}, ["mrr10"])
    with pytest.raises(ValueError, match="qrels are empty"):
        metrics.evaluate({}, {"q": {"d": 1.0}}, ["mrr"])
    with pytest.raises(ValueError, match="unknown metric 'mrr@x'"):
        metrics.evaluate({"q": {"d": 1}}, {}, ["mrr@x"])
    with pytest.raises(ValueError, match="NaN"):
        metrics.evaluate({"q": {"d": 1}}, {"q": {"d": float("nan")}}, ["mrr"])


def test_cli_json_and_trec(tmp_path, capsys):
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    run = {"q1": {"a": 2.0, "b": 1.0}, "q2": {"a": 2.0, "b": 1.0}}
    (tmp_path / "qrels.json").write_text(json.dumps(qrels))
    (tmp_path / "run.json").write_text(json.dumps(run))
    (tmp_path / "run.trec").write_text("q1 Q0 a 1 2.0 t\nq1 Q0 b 2 1.0 t\nq2 Q0 a 1 2.0 t\nq2 Q0 b 2 1.0 t\n")
    (tmp_path / "qrels.trec").write_text("q1 0 a 1\nq2 0 b 1\n")
    for run_file, qrels_file in (("run.json", "qrels.json"), ("run.trec", "qrels.trec")):
        out = tmp_path / f"{run_file}.metrics.json"
        argv = ["--run", str(tmp_path / run_file), "--qrels", str(tmp_path / qrels_file), "--output", str(out)]
        assert evaluate_command.main(argv + ["--metrics", "mrr@10", "precision@1"]) == 0
        assert json.loads(out.read_text()) == {"mrr@10": 0.75, "precision@1": 0.5}
    assert "mrr@10" in capsys.readouterr().out
    assert evaluate_command.main(["--run", str(tmp_path / "nope.json"), "--qrels", str(tmp_path / "qrels.json")]) == 2


def test_evaluate_metric_module_offline(ranx_evaluate):
    evaluate = pytest.importorskip("evaluate")
    import vl_joint_encoder

    path = f"{vl_joint_encoder.__path__[0]}/evaluate_metrics/retrieval_metrics"
    metric = evaluate.load(path)
    rng = random.Random(7)
    docs = [f"d{i}" for i in range(30)]
    predictions = [rng.sample(docs, rng.randint(0, 20)) for _ in range(25)]
    references = [rng.sample(docs, rng.randint(0, 4)) for _ in range(25)]
    names = ["mrr@10", "precision@1", "recall@20", "hit_rate@5", "ndcg@10", "map@20"]
    got = metric.compute(predictions=predictions, references=references, metrics=names)
    qrels = {f"q{i:02d}": {d: 1 for d in rel} for i, rel in enumerate(references)}
    run = {f"q{i:02d}": {d: float(len(r) - j) for j, d in enumerate(r)} for i, r in enumerate(predictions) if r}
    expected = ranx_evaluate(qrels, run, names)
    assert got == {name: float(expected[name]) for name in names}
