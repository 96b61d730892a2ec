"""Checkpoints and launches (issue 14): `--resume_from_checkpoint last` takes the newest COMPLETE checkpoint (a kill
at a random point of a save, then a rerun, gives the uninterrupted weights); an incomplete or partial checkpoint is
refused with the fix; a finished run is not trained further; a one-process `accelerate launch --num_processes 2`
and two trainings into one folder are refused; DeepSpeed / FSDP are refused (messages checked here and, under two
real processes, in test_trainer_distributed.py)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config_kwargs
from safetensors.torch import load_file
from synthetic_retrieval import all_texts, make_task, write_training_folder

from vl_joint_encoder import JointEncoderConfig, JointEncoderModel
from vl_joint_encoder.commands.train import main
from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer
from vl_joint_encoder.training.checkpoints import COMPLETE_FILE, check_launch, training_lock


HERE = os.path.dirname(os.path.abspath(__file__))
KILLER = os.path.join(HERE, "scripts", "checkpoint_training.py")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    queries, kb, store = make_task(n_entities=2)
    tokenizer = train_vl_t5_tokenizer(all_texts(queries, kb), vocab_size=80)
    torch.manual_seed(0)
    model = JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer), dropout_rate=0.1)))
    return write_training_folder(root, model, tokenizer, queries, kb, store, kb_file="kb.jsonl")


def config(workdir, out, **overrides):
    """8 queries, batch 4: 2 steps per epoch; 6 steps, a checkpoint every 2 (dropout on: RNG state must replay)."""
    values = {
        "model_name_or_path": str(workdir / "model"), "train_queries": [str(workdir / "queries.jsonl")],
        "kb": [str(workdir / "kb.jsonl")], "feature_store": str(workdir / "features.npz"), "output_dir": str(out),
        "use_cpu": True, "per_device_train_batch_size": 4, "max_steps": 6, "save_strategy": "steps", "save_steps": 2,
        "logging_steps": 1, "report_to": [], "disable_tqdm": True, "learning_rate": 3e-3, "seed": 0,
    }  # fmt: skip
    values.update(overrides)
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(values))
    return str(path)


@pytest.fixture(scope="module")
def straight(workdir):
    """The uninterrupted run: its final weights."""
    out = workdir / "straight"
    assert main([config(workdir, out)]) == 0
    return load_file(out / "model.safetensors")


def copy_run(source, target):
    shutil.copytree(source, target)
    for name in os.listdir(target):
        if name.startswith("checkpoint-"):
            with open(target / name / "trainer_state.json") as handle:
                assert json.load(handle)["global_step"] == int(name.split("-")[1])
    return target


def assert_same_weights(path, expected):
    got = load_file(path)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_every_checkpoint_is_marked_complete(workdir, straight):
    out = workdir / "straight"
    names = sorted(name for name in os.listdir(out) if name.startswith("checkpoint-"))
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for name in names:
        marker = json.loads((out / name / COMPLETE_FILE).read_text())
        assert marker["global_step"] == int(name.split("-")[1])
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(marker["files"])
        for file, size in marker["files"].items():
            assert os.path.getsize(out / name / file) == size
    assert not os.path.exists(out / ".training.lock")


@pytest.mark.parametrize("draw", [0, 1])
def test_kill_at_a_random_point_of_a_save_then_resume_last(workdir, straight, draw, capsys):
    """SIGKILL at a random file write of a random checkpoint save (before it, or with the file cut to half); the
    rerun with `--resume_from_checkpoint last` gives the uninterrupted weights, or, when no complete checkpoint
    is left, a clear refusal."""
    rng = random.Random(1000 + draw)
    writes_per_save = 7  # model.safetensors, optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json, marker...
    kill_at, mode = rng.randint(1, 3 * writes_per_save - 1), rng.choice(["before", "truncated"])
    out = workdir / f"killed{draw}"
    path = config(workdir, out)
    result = subprocess.run([sys.executable, KILLER, path, str(kill_at), mode], env=ENV, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == -signal.SIGKILL, (kill_at, mode, result.stderr[-3000:])
    assert not (out / "model.safetensors").exists()  # it died before the final save
    incomplete = [n for n in os.listdir(out) if n.startswith("checkpoint-") and not (out / n / COMPLETE_FILE).exists()]
    assert incomplete, f"write {kill_at} ({mode}) left every checkpoint complete"
    # naming the half-written checkpoint is refused, with the fix
    capsys.readouterr()
    assert main([path, "--resume_from_checkpoint", str(out / incomplete[0])]) == 2
    error = capsys.readouterr().err
    assert f"cannot resume from checkpoint {str(out / incomplete[0])!r}" in error and "Fix:" in error, error
    complete = [n for n in os.listdir(out) if n.startswith("checkpoint-") and (out / n / COMPLETE_FILE).exists()]
    status = main([path, "--resume_from_checkpoint", "last"])
    if not complete:
        assert status == 2 and "has no complete checkpoint" in capsys.readouterr().err
        return
    assert status == 0, capsys.readouterr().err
    assert_same_weights(out / "model.safetensors", straight)


@pytest.mark.parametrize("missing", ["scheduler.pt", "optimizer.pt", "trainer_state.json", "model.safetensors"])
def test_a_checkpoint_missing_a_file_is_refused(workdir, straight, missing, capsys):
    out = copy_run(workdir / "straight", workdir / f"missing_{missing}")
    os.remove(out / "checkpoint-4" / missing)
    path = config(workdir, out)
    capsys.readouterr()
    assert main([path, "--resume_from_checkpoint", str(out / "checkpoint-4")]) == 2
    error = capsys.readouterr().err
    assert f"{missing} (listed in {COMPLETE_FILE}) is missing" in error, error
    assert "resume from" in error and "checkpoint-6" in error  # the fix: the newest complete checkpoint
    if missing != "model.safetensors":
        assert "would train to other weights" in error


def test_resume_last_skips_a_newer_incomplete_checkpoint(workdir, straight, capsys):
    """An unfinished save of checkpoint-6 (no marker): `last` takes checkpoint-4 and reaches the same weights."""
    out = copy_run(workdir / "straight", workdir / "unmarked")
    os.remove(out / "model.safetensors")
    os.remove(out / "checkpoint-6" / COMPLETE_FILE)
    assert main([config(workdir, out), "--resume_from_checkpoint", "last"]) == 0
    assert_same_weights(out / "model.safetensors", straight)


def test_resuming_a_finished_run_is_refused_and_keeps_the_final_model(workdir, straight, capsys):
    out = copy_run(workdir / "straight", workdir / "finished")
    final = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main([config(workdir, out), "--resume_from_checkpoint", "last"]) == 2
    error = capsys.readouterr().err
    assert "is at step 6 and this run has 6 steps: that run is finished" in error and "raise max_steps" in error
    assert (out / "model.safetensors").read_bytes() == final
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == [f"checkpoint-{i}" for i in (2, 4, 6)]
    # raising max_steps trains further, from the same checkpoint
    assert main([config(workdir, out, max_steps=8), "--resume_from_checkpoint", "last"]) == 0
    assert (out / "checkpoint-8" / COMPLETE_FILE).exists()


@pytest.mark.slow
def test_accelerate_launch_num_processes_without_multi_gpu_is_refused(workdir, tmp_path):
    """The reproduction: `accelerate launch --num_processes 2` (no --multi_gpu) on CPU starts ONE process that
    would train alone with half the asked global batch."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vl_joint_encoder", "train",
               config(workdir, tmp_path / "out")]  # fmt: skip
    result = subprocess.run(
        command, env=dict(ENV, ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0, result.stderr[-3000:]  # accelerate's launcher exits 1 when its process fails
    assert "vl-joint-encoder train: error: `accelerate launch --num_processes 2` started ONE process" in result.stderr
    assert "add `--multi_gpu" in result.stderr
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_an_environment_of_several_processes_in_a_one_process_run_is_refused(monkeypatch, tmp_path):
    from vl_joint_encoder.training.arguments import JointEncoderTrainingArguments

    args = JointEncoderTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert args.world_size == 1
    check_launch(args)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # e.g. `mpirun -n 2` without a distributed launch setup
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_SIZE=2 processes but this one trains alone"):
        check_launch(args)


def test_two_trainings_into_one_folder_are_refused(tmp_path):
    """The second of two trainings writing into one output folder is refused while the first holds it."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from vl_joint_encoder.training.checkpoints import training_lock\n"
         "with training_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"another training \\(process {child.pid}\\) is writing into"):
            with training_lock(str(tmp_path)):
                pass
    finally:
        child.kill()
        child.wait()
    with training_lock(str(tmp_path)):  # the lock goes with the process
        pass
    assert os.listdir(tmp_path) == []
