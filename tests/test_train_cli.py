import json
import os
import subprocess
import sys

import datasets
import pytest
import torch
import yaml
from conftest import tiny_config_kwargs
from synthetic_retrieval import all_texts, make_task, write_training_folder
from transformers import AutoModel

from vl_joint_encoder import JointEncoderConfig, JointEncoderModel
from vl_joint_encoder.commands.train import main
from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny model + tokenizer, queries/KB as JSONL and Parquet, features as .npz."""

    root = tmp_path_factory.mktemp("cli")
    queries, kb, store = make_task(n_entities=4)
    tokenizer = train_vl_t5_tokenizer(all_texts(queries, kb), vocab_size=80)
    torch.manual_seed(0)
    model = JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer))))
    return write_training_folder(root, model, tokenizer, queries, kb, store)


def config(workdir, out, **overrides):
    cfg = {
        "model_name_or_path": str(workdir / "model"),
        "train_queries": [str(workdir / "queries.jsonl")],
        "kb": [str(workdir / "kb.parquet")],
        "feature_store": str(workdir / "features.npz"),
        "output_dir": str(out),
        "use_cpu": True,
        "per_device_train_batch_size": 4,
        "max_steps": 3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "learning_rate": 1e-3,
    }
    cfg.update(overrides)
    return cfg


def test_yaml_config_trains_and_saves_a_loadable_model(workdir, tmp_path):
    # evaluation on held-out text-only queries through RetrievalEvaluator, at step 2 and at the end
    rows = [json.loads(line) for line in open(workdir / "queries.jsonl")]
    kb = datasets.Dataset.from_parquet(str(workdir / "kb.parquet")).remove_columns("image")
    kb.to_json(str(tmp_path / "eval_kb.jsonl"))
    with open(tmp_path / "eval.jsonl", "w") as f:
        f.writelines(json.dumps({k: r[k] for k in ("id", "question", "positive_ids")}) + "\n" for r in rows[:6])
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config(workdir, tmp_path / "out", eval_queries=[str(tmp_path / "eval.jsonl")],
                                          eval_kb=[str(tmp_path / "eval_kb.jsonl")], eval_strategy="steps",
                                          eval_steps=2, eval_metrics=["mrr@10", "hit_rate@5"])))
    assert main([str(path)]) == 0
    out = tmp_path / "out"
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evaluations = [entry for entry in history if "eval_mrr@10" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 3, 3]  # eval_steps, last step, final evaluate()
    assert all(0 < entry["eval_mrr@10"] <= 1 and 0 <= entry["eval_hit_rate@5"] <= 1 for entry in evaluations)
    assert "eval_mrr@10" in (out / "README.md").read_text()
    state = json.loads((out / "train_results.json").read_text())
    assert state["train_loss"] > 0
    loaded = AutoModel.from_pretrained(out, trust_remote_code=True)
    original = AutoModel.from_pretrained(workdir / "model", trust_remote_code=True)
    assert not torch.equal(loaded.shared.weight, original.shared.weight)
    assert "vl-joint-encoder" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"similarity": "dot"}, "similarity='dot' in the arguments but the model config says 'cosine'"),
        ({"per_device_train_batch_size": 64}, "16 training queries but one global batch takes 64"),
        ({"columns": "viquae"}, "question='input'"),
        ({"feature_store": None}, "does not exist: check image_root (None)"),
    ],
)
def test_bad_inputs_exit_with_a_message(workdir, tmp_path, capsys, overrides, message):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config(workdir, tmp_path / "out", **overrides)))
    assert main([str(path)]) == 2
    assert message in capsys.readouterr().err


def test_missing_kb_ids_are_listed(workdir, tmp_path, capsys):
    rows = [json.loads(line) for line in open(workdir / "queries.jsonl")]
    rows[0]["positive_ids"] = ["no-such-passage"]
    with open(tmp_path / "q.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    args = ["--model_name_or_path", str(workdir / "model"), "--train_queries", str(tmp_path / "q.jsonl"),
            "--kb", str(workdir / "kb.parquet"), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]
    assert main(args) == 2
    assert "'q_0_born'->'no-such-passage'" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_accelerate_launch_on_cpu(workdir, tmp_path):
    """A real 2-process DDP run (gloo): the global batch is 2 x 4 queries and negatives are shared."""
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config(workdir, tmp_path / "out", log_level="info")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "vl_joint_encoder", "train", str(path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in result.stderr
    state = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert state["train_loss"] > 0
    assert "'loss'" in result.stdout + result.stderr  # the Trainer's log line, from the main process


def test_config_file_then_overrides(workdir, tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config(workdir, tmp_path / "out")))
    # an override on the command line wins over the file (here: a similarity the model does not use, refused)
    assert main([str(path), "--similarity", "dot"]) == 2
    assert "similarity='dot' in the arguments" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({**config(workdir, tmp_path / "out"), "n_hard_negative": 3}))
    assert main([str(path)]) == 2  # a sole file: HfArgumentParser's own check
    assert "n_hard_negative" in capsys.readouterr().err
    assert main([str(path), "--max_steps", "1"]) == 2
    assert "unknown argument(s) ['n_hard_negative']" in capsys.readouterr().err
