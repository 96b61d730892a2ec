"""`JointEncoderTrainer.train()` in a real 2-process `accelerate launch` (gloo, CPU) lands, after every optimizer
step, on the parameters of one process trained on the concatenated batch, in every configuration of
tests/scripts/trainer_matrix.py (shared / separate towers x plain / GradCache / gradient accumulation x text-only /
image / mixed passages x queries with / without images, and each freezing option), uneven splits (3 + 1) included;
no DDP unused-parameter warning; DeepSpeed / FSDP and a one-process `accelerate launch --num_processes 2` are
refused up front."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file


HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "scripts", "trainer_matrix.py")
sys.path.insert(0, os.path.join(HERE, "scripts"))

import trainer_matrix  # noqa: E402


pytestmark = pytest.mark.slow  # one 2-process launch for the whole module (~1-3 min on a shared 2-core machine)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
ENV = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from synthetic_retrieval import all_texts, make_task

    from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer

    queries, kb, _ = make_task(n_entities=3)
    path = tmp_path_factory.mktemp("tokenizer")
    train_vl_t5_tokenizer(all_texts(queries, kb), vocab_size=120).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def matrix(tokenizer_dir, tmp_path_factory):
    """Start the 2-process run; compute the one-process references meanwhile; return both."""
    from transformers import AutoTokenizer

    output_dir = tmp_path_factory.mktemp("matrix")
    command = LAUNCH + ["--main_process_port", str(free_port()), SCRIPT, tokenizer_dir, str(output_dir)]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    references = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 3 processes on the CI machine's 2 cores: more threads only contend
    try:
        for name, config in trainer_matrix.configurations().items():
            references[name] = trainer_matrix.train(
                config, tokenizer, str(output_dir / "reference" / name), 2 * trainer_matrix.PER_DEVICE
            )
        output, _ = process.communicate(timeout=600)
    finally:
        torch.set_num_threads(threads)
        if process.poll() is None:
            process.kill()
            process.wait()
    print(f"matrix: {len(references)} configurations, {time.perf_counter() - start:.0f} s")
    assert process.returncode == 0, output[-6000:]
    return output_dir, output, references


@pytest.mark.parametrize("name", list(trainer_matrix.configurations()))
def test_two_processes_match_one_process_after_every_step(matrix, name):
    output_dir, _, references = matrix
    expected = references[name]
    got = load_file(output_dir / f"{name}.safetensors")
    config = trainer_matrix.configurations()[name]
    assert len(expected) == (1 if config["step"] == "accumulation" else 2)
    assert set(got) == set(trainer_matrix.flatten(expected))
    for step, parameters in enumerate(expected):
        for key, value in parameters.items():
            torch.testing.assert_close(got[f"step{step}/{key}"], value, rtol=0, atol=1e-5, msg=f"step {step}: {key}")


def test_the_matrix_trains_and_every_case_is_covered(matrix, tokenizer_dir):
    """The configurations cover the matrix, and the first step moves the parameters (matching is not trivial)."""
    from transformers import AutoTokenizer

    _, _, references = matrix
    configs = trainer_matrix.configurations()
    for field, values in (("towers", {"shared", "separate"}), ("step", {"plain", "grad_cache", "accumulation"}),
                          ("passages", {"text", "image", "mixed"}), ("queries", {"image", "text"}),
                          ("freeze", {"none", "clip_tower", "first_block", "adapters", "projection"}),
                          ("lora_r", {None, 2})):  # fmt: skip
        assert {config.get(field) for config in configs.values()} == values
    vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    for name, steps in references.items():
        separate = configs[name]["towers"] == "separate"
        if configs[name].get("lora_r"):  # PEFT names; lora_B starts at zero (peft's initialisation)
            lora_b = [key for key in steps[0] if "lora_B" in key]
            assert lora_b and any(steps[0][key].abs().sum() > 0 for key in lora_b), name
            assert all("lora_" in key or "modules_to_save" in key for key in steps[0]), name  # the base is frozen
            continue
        initial = dict(trainer_matrix.build_model(configs[name], vocab_size).named_parameters())
        moved = [key for key, value in steps[0].items()
                 if not torch.equal(value, initial[key.split(".", 1)[1] if separate else key])]  # fmt: skip
        assert moved, f"{name}: the first step changed no parameter"
        if configs[name].get("optim") == "adamw_torch":  # unused: not even weight decay moves them
            unused = "visual_embedding." if not separate else "passage_encoder.visual_embedding."
            frozen = [key for key in steps[-1] if key.startswith(unused)]
            assert frozen and all(torch.equal(steps[-1][key], initial[key.split(".", 1)[1] if separate else key])
                                  for key in frozen), name  # fmt: skip


def test_no_unused_parameter_search_warning(matrix):
    output_dir, output, _ = matrix
    logs = output + "".join(open(output_dir / f"log_rank{rank}.txt").read() for rank in range(2))
    assert "find_unused_parameters" not in logs
    assert "Expected to mark a variable ready only once" not in logs


def test_fsdp_and_deepspeed_are_refused_before_the_first_step(matrix):
    """Under 2 real processes: FSDP is refused by JointEncoderTrainer with the alternative; DeepSpeed does not
    install on this CPU machine, and transformers says so (JointEncoderTrainer would refuse it after that)."""
    output_dir, _, _ = matrix
    refusals = json.loads((output_dir / "refusals.json").read_text())
    assert refusals["fsdp"].startswith("ValueError: JointEncoderTrainer does not support FSDP"), refusals["fsdp"]
    assert not os.path.exists(output_dir / "runs" / "fsdp" / "checkpoint-1")  # refused before the first step
    assert "accelerate launch --multi_gpu" in refusals["fsdp"]
    deepspeed = refusals["deepspeed"]
    assert deepspeed.startswith("ValueError: JointEncoderTrainer does not support DeepSpeed") or (
        "deepspeed" in deepspeed.lower() and "not found" in deepspeed
    ), deepspeed
