"""ranx's metrics as numba compiles them (the suite runs ranx interpreted: see conftest.py) agree with the
interpreted ones, in a process where numba compiles: the installed numba / llvmlite / ranx work together."""

import json
import os
import random
import subprocess
import sys

import pytest

from vl_joint_encoder.retrieval.metrics import evaluate


METRICS = ["mrr@10", "recall@1", "recall@10", "precision@1"]  # the demo's, and the train CLI's default


def random_case(seed: int = 0, n_queries: int = 50, n_docs: int = 80):
    rng = random.Random(seed)
    qrels = {f"q{q}": {f"d{d}": 1 for d in rng.sample(range(n_docs), rng.randint(1, 3))} for q in range(n_queries)}
    run = {f"q{q}": {f"d{d}": rng.random() for d in rng.sample(range(n_docs), 20)} for q in range(n_queries - 3)}
    return qrels, run


@pytest.mark.slow  # numba compiles 3 metric families: ~30 s on an idle core (cached on disk afterwards)
def test_compiled_metrics_equal_interpreted_metrics(tmp_path):
    assert os.environ.get("NUMBA_DISABLE_JIT") == "1"
    qrels, run = random_case()
    interpreted = evaluate(qrels, run, METRICS)
    (tmp_path / "case.json").write_text(json.dumps([qrels, run]))
    script = (
        "import json, sys\n"
        "import numba\n"
        "from vl_joint_encoder.retrieval.metrics import evaluate\n"
        "assert not numba.config.DISABLE_JIT\n"
        f"qrels, run = json.load(open({str(tmp_path / 'case.json')!r}))\n"
        f"print(json.dumps(evaluate(qrels, run, {METRICS!r})))\n"
    )
    env = {**os.environ, "NUMBA_DISABLE_JIT": "0"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = json.loads(result.stdout.strip().splitlines()[-1])
    assert compiled.keys() == interpreted.keys()
    for name in METRICS:
        assert compiled[name] == pytest.approx(interpreted[name], abs=1e-12), name
    assert 0 < interpreted["mrr@10"] < 1
