"""Late fusion: the authors' defmin + global z-score + weighted sum and RRF against hand computations, tuning against
an exhaustive search of the same grid, the `fuse` command."""

import json
import math

import numpy as np
import pytest

from vl_joint_encoder.commands.fuse import main
from vl_joint_encoder.retrieval.fusion import default_minimum, fuse_runs, global_zmuv, tune_fusion
from vl_joint_encoder.retrieval.metrics import evaluate


A = {"q1": {"a": 3.0, "b": 1.0}, "q2": {"c": 2.0}}
B = {"q1": {"b": 0.9, "d": 0.1}, "q2": {}}


def test_default_minimum_and_global_zmuv_by_hand():
    filled = default_minimum([A, B])
    assert filled[0] == {"q1": {"a": 3.0, "b": 1.0, "d": 1.0}, "q2": {"c": 2.0}}
    assert filled[1] == {"q1": {"b": 0.9, "d": 0.1, "a": 0.1}, "q2": {}}  # a run without results stays empty
    scores = [3.0, 1.0, 1.0, 2.0]  # every score of every question
    mean, std = sum(scores) / 4, math.sqrt(sum((s - 1.75) ** 2 for s in scores) / 4)
    normalised = global_zmuv(filled[0])
    assert normalised["q2"]["c"] == pytest.approx((2.0 - mean) / std)
    assert global_zmuv({"q": {"x": 5.0}}) == {"q": {"x": 0.0}}  # std floored at 1e-9


def test_wsum_and_rrf_by_hand():
    fused = fuse_runs([A, B], method="wsum", norm="gzmuv", params={"weights": [0.3, 0.7]})
    a, b = global_zmuv(default_minimum([A, B])[0]), global_zmuv(default_minimum([A, B])[1])
    expected = {d: 0.3 * a["q1"][d] + 0.7 * b["q1"][d] for d in "abd"}
    assert fused["q1"] == pytest.approx(expected)
    assert list(fused["q1"]) == sorted(expected, key=lambda d: -expected[d])  # ranked
    assert fused["q2"] == pytest.approx({"c": 0.3 * a["q2"]["c"]})  # missing from B: counts 0
    rrf = fuse_runs([A, B], method="rrf", norm=None, params={"k": 60}, defmin=False)
    assert rrf["q1"] == pytest.approx({"a": 1 / 61, "b": 1 / 62 + 1 / 61, "d": 1 / 62})
    with pytest.raises(ValueError, match="needs params"):
        fuse_runs([A, B])


def test_tuning_finds_the_best_weights_of_the_grid():
    rng = np.random.default_rng(0)
    runs = [{f"q{q}": {f"d{d}": float(rng.normal()) for d in range(8)} for q in range(12)} for _ in range(2)]
    qrels = {f"q{q}": {f"d{int(rng.integers(8))}": 1} for q in range(12)}
    best, report = tune_fusion(runs, qrels, metric="mrr@100")
    grid = [(round(w, 1), round(1 - w, 1)) for w in np.arange(0, 1.01, 0.1)]
    scores = {}
    for weights in grid:
        if sum(weights) != 1.0:  # ranx's grid keeps the combinations whose float sum is exactly 1.0
            continue
        scores[weights] = evaluate(qrels, fuse_runs(runs, params={"weights": list(weights)}), ["mrr@100"])["mrr@100"]
    assert max(report.values()) == pytest.approx(max(scores.values()))
    assert scores[tuple(best["weights"])] == pytest.approx(max(scores.values()))
    assert all(isinstance(w, float) for w in best["weights"])


def test_fuse_command(tmp_path, capsys):
    for name, run in (("a", A), ("b", B)):
        (tmp_path / f"{name}.json").write_text(json.dumps(run))
    (tmp_path / "qrels.json").write_text(json.dumps({"q1": {"b": 1}, "q2": {"c": 1}}))
    runs = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    assert main(["--runs", *runs, "--fit_runs", *runs, "--fit_qrels", str(tmp_path / "qrels.json"),
                 "--output", str(tmp_path / "fused.json")]) == 0  # fmt: skip
    params = json.loads((tmp_path / "fused.json.params.json").read_text())
    assert params["norm"] == "gzmuv" and params["defmin"] is True and len(params["params"]["weights"]) == 2
    fused = json.loads((tmp_path / "fused.json").read_text())
    assert next(iter(fused["q1"])) == "b"  # B ranks it first, A second: the tuned weights follow B
    assert main(["--runs", runs[0], runs[1], "--weights", "0.5", "--output", str(tmp_path / "x.json")]) == 2
    assert "1 weights for 2 runs" in capsys.readouterr().err
