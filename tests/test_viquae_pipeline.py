"""The ViQuAE recipe's steps on the miniature (published layout): prepare, train with `accelerate launch` on 2 CPU
processes (gloo), dense runs with images / text only / extracted global vectors, mined negatives, fusion, the metric
table. One slow test: each step's outputs are checked as it goes."""

import json
import os
import subprocess
import sys

import datasets
import pytest
import yaml
from viquae_miniature import write_viquae_miniature

from vl_joint_encoder.commands import fuse, viquae_evaluate, viquae_negatives, viquae_prepare, viquae_search
from vl_joint_encoder.data.extraction import extract_features
from vl_joint_encoder.demo.tiny_model import TinyModelSize, build_tiny_model
from vl_joint_encoder.retrieval.runs import load_run


@pytest.mark.slow
def test_recipe_steps_on_the_miniature(tmp_path):
    mini = write_viquae_miniature(tmp_path / "mini", n_articles=12)
    out = tmp_path / "out"
    sources = ["--questions", str(out / "questions"), "--articles", str(out / "articles"),
               "--passages", str(mini["passages"])]  # fmt: skip
    # 1. prepare from the hub layout (JSONL questions, the three .jsonl.gz article files)
    assert viquae_prepare.main(["--questions", str(mini["dataset_jsonl"]), "--articles", str(mini["wikipedia"]),
                                "--passages", str(mini["passages"]), "--output", str(out), "--k", "20"]) == 0  # fmt: skip
    prepared = datasets.load_from_disk(str(out / "questions"))
    assert {"provenance_indices", "BM25_provenance_indices", "BM25_irrelevant_indices"} <= set(prepared["train"].column_names)

    # 2. a tiny random starting model, trained with 2 processes (negatives shared across them)
    texts = list(prepared["train"]["input"]) + list(datasets.load_from_disk(str(mini["passages"]))["passage"])
    model, processor = build_tiny_model(texts, TinyModelSize(d_model=32, vision_hidden_size=32, vocab_size=300))
    model.save_pretrained(tmp_path / "start")
    processor.save_pretrained(tmp_path / "start")
    config = {"model_name_or_path": str(tmp_path / "start"), "questions": str(out / "questions"),
              "articles": str(out / "articles"), "passages": str(mini["passages"]), "image_root": str(mini["images"]),
              "key": "BM25", "eval_split": "validation", "title_mode": "replace", "output_dir": str(tmp_path / "model"),
              "use_cpu": True, "per_device_train_batch_size": 2, "max_steps": 3, "learning_rate": 1e-3,
              "logging_steps": 1, "save_strategy": "no", "report_to": [], "disable_tqdm": True,
              "passage_max_length": 64, "log_level": "info"}  # fmt: skip
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "vl_joint_encoder", "viquae-train", str(tmp_path / "train.yaml")]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in result.stderr
    trained = json.loads((tmp_path / "model" / "all_results.json").read_text())
    assert trained["train_loss"] > 0 and 0 <= trained["eval_mrr@100"] <= 1
    assert "positives `BM25_provenance_indices`" in (tmp_path / "model" / "README.md").read_text()

    # 3. dense runs: images through the articles, text only, and global vectors extracted from the images
    search = sources + ["--image_root", str(mini["images"]), "--model", str(tmp_path / "model"), "--output",
                        str(out / "runs"), "--splits", "train", "validation", "test", "--cpu", "--k", "20"]  # fmt: skip
    assert viquae_search.main(search + ["--embeddings", str(tmp_path / "emb"), "--system", "dense"]) == 0
    assert viquae_search.main(search + ["--embeddings", str(tmp_path / "emb-text"), "--system", "dense-text-only",
                                        "--text_only"]) == 0  # fmt: skip
    extract_features(str(mini["images"]), str(tmp_path / "vectors"), str(tmp_path / "model"), shard_size=64)
    assert viquae_search.main(search + ["--embeddings", str(tmp_path / "emb-vec"), "--system", "dense-vectors",
                                        "--image_vectors", str(tmp_path / "vectors")]) == 0  # fmt: skip
    dense, text_only = load_run(out / "runs" / "dense.test.json"), load_run(out / "runs" / "dense-text-only.test.json")
    assert dense.keys() == set(prepared["test"]["id"]) and all(len(r) == 20 for r in dense.values())
    assert dense != text_only != load_run(out / "runs" / "dense-vectors.test.json")

    # 4. hard negatives mined with the trained model, with the answer-matching guard
    assert viquae_negatives.main(["--questions", str(out / "questions"), "--passages", str(mini["passages"]),
                                  "--runs", f"train={out / 'runs' / 'dense.train.json'}", "--key", "dense"]) == 0  # fmt: skip
    mined = datasets.load_from_disk(str(out / "questions"))["train"]
    from vl_joint_encoder.viquae.loading import load_passages, raw_texts
    from vl_joint_encoder.viquae.relevance import AnswerMatcher

    passages = load_passages(str(mini["passages"]))
    for item in mined:
        matcher = AnswerMatcher.from_item(item)
        assert not any(matcher.contains(t) for t in raw_texts(passages, item["dense_irrelevant_indices"]))
        assert set(item["dense_irrelevant_indices"]) <= {int(d) for d in load_run(out / "runs" / "dense.train.json")[item["id"]]}
    assert "BM25_irrelevant_indices" in mined.column_names  # the earlier columns are kept

    # 5. fusion tuned on validation, 6. the metric table on test
    evaluate = ["--questions", str(out / "questions"), "--passages", str(mini["passages"])]
    runs = {name: out / "runs" / f"{name}.{{}}.json" for name in ("dense",)}
    bm25 = out / "runs" / "bm25.{}.json"
    assert viquae_evaluate.main(evaluate + ["--split", "validation", "--runs", f"bm25={bm25.as_posix().format('validation')}",
                                            f"dense={str(runs['dense']).format('validation')}",
                                            "--qrels_output", str(out / "qrels.val.json")]) == 0  # fmt: skip
    assert fuse.main(["--runs", str(bm25).format("test"), str(runs["dense"]).format("test"),
                      "--fit_runs", str(bm25).format("validation"), str(runs["dense"]).format("validation"),
                      "--fit_qrels", str(out / "qrels.val.json"), "--output", str(out / "fused.test.json")]) == 0  # fmt: skip
    assert viquae_evaluate.main(evaluate + ["--split", "test", "--output", str(out / "metrics.json"), "--runs",
                                            f"bm25={str(bm25).format('test')}", f"dense={str(runs['dense']).format('test')}",
                                            f"fused={out / 'fused.test.json'}"]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"bm25", "dense", "fused"}
    assert all(set(m) == {"mrr@100", "precision@1", "precision@20", "hit_rate@20"} for m in metrics.values())
    assert all(0 <= v <= 1 for m in metrics.values() for v in m.values())


def test_run_sh_refuses_incomplete_arguments(tmp_path):
    """The recipe script's interface (the one checks call); the run itself is the steps above, reported in README."""
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "viquae", "run.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    result = subprocess.run(["bash", script, "--questions", "Q", "--articles", "A", "--passages", "P",
                             "--images", "D"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and "--output is required" in result.stderr
    result = subprocess.run(["bash", script, "--output", str(tmp_path), "--smal"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown argument --smal" in result.stderr
