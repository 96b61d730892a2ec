"""`train` takes every kind of feature store that encode / search take, and evaluates during training the way the
Trainer expects (metric_for_best_model from the evaluator, load_best_model_at_end), with the dev KB encoded once
across processes."""

import json
import os
import subprocess
import sys

import datasets
import h5py
import numpy as np
import pytest
import torch
from conftest import tiny_config_kwargs
from PIL import Image
from safetensors.numpy import save_file
from skimage import data as photos
from synthetic_retrieval import all_texts, make_task

from vl_joint_encoder import JointEncoderConfig, JointEncoderModel
from vl_joint_encoder.commands.train import main
from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    queries, kb, store = make_task(n_entities=4)
    tokenizer = train_vl_t5_tokenizer(all_texts(queries, kb), vocab_size=80)
    torch.manual_seed(0)
    model = JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer), dropout_rate=0.0)))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with open(root / "queries.jsonl", "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in queries)
    datasets.Dataset.from_list(kb).to_parquet(str(root / "kb.parquet"))
    return root, store


def train_loss(workdir, store_path, tmp_path, name) -> float:
    root, _ = workdir
    config = {
        "model_name_or_path": str(root / "model"), "train_queries": [str(root / "queries.jsonl")],
        "kb": [str(root / "kb.parquet")], "feature_store": str(store_path), "output_dir": str(tmp_path / name),
        "use_cpu": True, "per_device_train_batch_size": 4, "max_steps": 1, "logging_steps": 1, "save_strategy": "no",
        "report_to": [], "disable_tqdm": True, "learning_rate": 1e-3, "seed": 3,
    }  # fmt: skip
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    assert main([str(tmp_path / f"{name}.json")]) == 0
    history = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
    return next(entry["loss"] for entry in history if "loss" in entry)


def test_every_store_kind_trains_on_the_same_features(workdir, tmp_path):
    """The same arrays in a .npz, a .safetensors, a VL-Adapter-layout HDF5 file and an extract-features folder give
    the same first training step; the features are used (another store gives another loss)."""
    _, store = workdir
    np.savez(tmp_path / "store.npz", **store)
    save_file({k: np.ascontiguousarray(v) for k, v in store.items()}, str(tmp_path / "store.safetensors"))
    with h5py.File(tmp_path / "store.h5", "w") as handle:  # VL-Adapter's CLIP layout: a group per image id
        for key, value in store.items():
            handle.create_group(key)["features"] = value
    reference = train_loss(workdir, tmp_path / "store.npz", tmp_path, "npz")
    assert train_loss(workdir, tmp_path / "store.safetensors", tmp_path, "safetensors") == reference
    assert train_loss(workdir, tmp_path / "store.h5", tmp_path, "h5") == reference
    np.savez(tmp_path / "other.npz", **{k: v[::-1].copy() * 2 for k, v in store.items()})
    assert train_loss(workdir, tmp_path / "other.npz", tmp_path, "other") != reference


def test_an_extract_features_folder_trains_like_its_arrays(workdir, tmp_path):
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    from vl_joint_encoder.data.extraction import extract_features
    from vl_joint_encoder.data.feature_stores import ExtractedFeatureStore
    from vl_joint_encoder.vision import tiny_clip_vision_config

    (tmp_path / "images").mkdir()
    for e, name in enumerate(PHOTOS):  # the image ids are the store keys of the task: entity_0 ... entity_3
        Image.fromarray(getattr(photos, name)()).convert("RGB").resize((48, 40)).save(tmp_path / "images" / f"entity_{e}.png")
    torch.manual_seed(0)
    CLIPVisionModel(tiny_clip_vision_config(hidden_size=16, intermediate_size=37)).save_pretrained(tmp_path / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    extract_features(str(tmp_path / "images"), str(tmp_path / "feats"), str(tmp_path / "clip"), grid_pool_size=2)
    extracted = ExtractedFeatureStore(tmp_path / "feats")
    assert sorted(extracted.keys()) == [f"entity_{e}" for e in range(4)]
    arrays = {}
    for key in extracted.keys():
        arrays[key] = extracted[key]["visual_feats"]
        arrays[f"{key}.visual_pos"] = extracted[key]["visual_pos"]
    np.savez(tmp_path / "same.npz", **arrays)
    assert train_loss(workdir, tmp_path / "feats", tmp_path, "folder") == train_loss(
        workdir, tmp_path / "same.npz", tmp_path, "same"
    )


@pytest.mark.slow
def test_two_processes_evaluate_once_and_keep_the_best_model(workdir, tmp_path):
    """2 real processes: evaluation every 2 steps with the evaluator's primary metric as metric_for_best_model; the
    final metrics (after load_best_model_at_end) equal one process evaluating the saved model."""
    root, store = workdir
    np.savez(tmp_path / "store.npz", **store)
    rows = [json.loads(line) for line in open(root / "queries.jsonl")]
    with open(tmp_path / "eval.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[::2])
    config = {
        "model_name_or_path": str(root / "model"), "train_queries": [str(root / "queries.jsonl")],
        "kb": [str(root / "kb.parquet")], "feature_store": str(tmp_path / "store.npz"),
        "output_dir": str(tmp_path / "out"), "use_cpu": True, "per_device_train_batch_size": 2, "max_steps": 4,
        "logging_steps": 1, "learning_rate": 3e-3, "report_to": [], "disable_tqdm": True,
        "eval_queries": [str(tmp_path / "eval.jsonl")], "eval_metrics": ["mrr@10", "hit_rate@3"],
        "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps", "save_steps": 2,
        "load_best_model_at_end": True,
    }  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "vl_joint_encoder", "train", str(tmp_path / "train.json")]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if "eval_mrr@10" in entry]
    assert [entry["step"] for entry in evaluations][:2] == [2, 4]
    assert state["best_metric"] == max(entry["eval_mrr@10"] for entry in evaluations[:2])
    final = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert final["eval_mrr@10"] == state["best_metric"]

    from vl_joint_encoder.retrieval.embed import load_model_and_processor
    from vl_joint_encoder.retrieval.evaluator import RetrievalEvaluator

    model, tokenizer = load_model_and_processor(tmp_path / "out")
    evaluator = RetrievalEvaluator(tmp_path / "eval.jsonl", root / "kb.parquet", tokenizer,
                                   metrics=["mrr@10", "hit_rate@3"], feature_store=tmp_path / "store.npz")
    one_process = evaluator(model.eval())
    assert one_process["mrr@10"] == pytest.approx(final["eval_mrr@10"], abs=1e-12)
    assert one_process["hit_rate@3"] == pytest.approx(final["eval_hit_rate@3"], abs=1e-12)
