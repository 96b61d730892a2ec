"""Evaluation as ViQuAE's authors do it: qrels extended by answer matching on the retrieved passages, fused across
systems; against hand-made expectations on the hand-written world."""

import json

import pytest
from viquae_handmade import write_handmade

from vl_joint_encoder.commands.viquae_evaluate import main
from vl_joint_encoder.viquae.evaluation import evaluate_systems, extended_qrels
from vl_joint_encoder.viquae.loading import load_passages, load_questions, raw_texts
from vl_joint_encoder.viquae.preparation import matchers


# q1 "where was this painter born?" (Kerrowick): passages 0 and 3 contain it, 5 has "Kerrowick's" (no: "kerrowicks")
RUN_A = {"q1": {"3": 0.9, "4": 0.5, "0": 0.1}}
RUN_B = {"q1": {"0": 0.8, "5": 0.7}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    paths = write_handmade(tmp_path_factory.mktemp("handmade"))
    questions = load_questions(str(paths["questions"]), ["train"])["train"].select([0])  # q1
    passages = load_passages(str(paths["passages"]))
    return paths, questions, passages


def test_qrels_are_extended_by_answer_matching(world):
    _, questions, passages = world
    texts = lambda rows: raw_texts(passages, rows)  # noqa: E731
    per_system = extended_qrels({"a": RUN_A, "b": RUN_B}, matchers(questions), texts, base_qrels={"q1": {"0": 1}})
    assert per_system == {"a": {"q1": {"0": 1, "3": 1}}, "b": {"q1": {"0": 1}}}
    assert extended_qrels({"b": RUN_B}, matchers(questions), texts) == {"b": {"q1": {"0": 1}}}  # from empty, as meerqat


def test_fused_and_per_system_qrels(world):
    _, questions, passages = world
    texts = lambda rows: raw_texts(passages, rows)  # noqa: E731
    metrics = ["mrr@100", "precision@1", "precision@20", "hit_rate@20", "recall@100"]
    fused, qrels = evaluate_systems({"a": RUN_A, "b": RUN_B}, matchers(questions), texts, None, metrics)
    per_system, _ = evaluate_systems({"a": RUN_A, "b": RUN_B}, matchers(questions), texts, None, metrics, "per-system")
    assert qrels == {"q1": {"0": 1, "3": 1}}
    # by hand: A ranks 3 (relevant) first, B ranks 0 (relevant) first; 2 relevant passages in all, B finds one
    assert fused["a"] == pytest.approx({"mrr@100": 1, "precision@1": 1, "precision@20": 2 / 20, "hit_rate@20": 1,
                                        "recall@100": 1})  # fmt: skip
    assert fused["b"]["recall@100"] == pytest.approx(0.5) and per_system["b"]["recall@100"] == pytest.approx(1.0)
    for system in ("a", "b"):  # the authors' metrics do not depend on the other systems
        for name in metrics[:4]:
            assert fused[system][name] == pytest.approx(per_system[system][name])


def test_evaluate_command(world, tmp_path, capsys):
    paths, _, _ = world
    (tmp_path / "a.json").write_text(json.dumps(RUN_A))
    (tmp_path / "bad.json").write_text(json.dumps({"q1": {"99": 1.0}}))
    args = ["--questions", str(paths["questions"]), "--split", "train", "--passages", str(paths["passages"]),
            "--base_qrels", "none"]  # fmt: skip
    out = tmp_path / "metrics.json"
    assert main(args + ["--runs", f"a={tmp_path / 'a.json'}", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    # q1 scores 1 (passage 3 first); q2, q3 are not in the run and score 0
    assert results["a"]["mrr@100"] == pytest.approx(1 / 3)
    assert main(args + ["--runs", f"a={tmp_path / 'bad.json'}"]) == 2
    assert "ids that are not passage rows" in capsys.readouterr().err
