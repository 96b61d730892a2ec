"""A real 2-process `accelerate launch` (gloo, CPU) gives the loss and the gradients of one process on the
concatenated batch: plain loss with a shared DDP tower, and GradCache with separate DDP towers."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from scripts.tiny_retrieval import contrastive_batch, tiny_model

from vl_joint_encoder.training import distributed
from vl_joint_encoder.training.loss import InBatchContrastiveLoss


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "distributed_loss.py")
PARTS = ("loss", "accuracy", "mrr")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("distributed_loss")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), SCRIPT, str(output_dir),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [load_file(output_dir / f"rank{rank}.safetensors") for rank in range(2)]


def reference(query_model, passage_model):
    """One process, the whole concatenated batch, no gathering: plain autograd."""
    batch = contrastive_batch(num_queries=5, hard_negatives=1, seed=1)
    loss_fn = InBatchContrastiveLoss.from_config(query_model.config, gather_across_processes=False)
    queries = query_model(**batch["query"]).pooler_output
    passages = passage_model(**batch["passage"]).pooler_output
    parts = loss_fn(queries, passages, batch["positive_index"], batch["passage_keys"], batch["query_positive_keys"])
    parts["loss"].backward()
    grads = {}
    for tower, model in enumerate((query_model,) if query_model is passage_model else (query_model, passage_model)):
        grads.update({f"{tower}.{name}": param.grad for name, param in model.named_parameters()})
    return {name: parts[name].item() for name in PARTS}, grads


def assert_matches(result, prefix, expected_parts, expected_grads):
    for name in PARTS:
        assert result[f"{prefix}/{name}"].item() == pytest.approx(expected_parts[name], rel=1e-5, abs=1e-6), name
    grads = {key[len(prefix) + 6 :]: value for key, value in result.items() if key.startswith(f"{prefix}/grad/")}
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=f"{prefix} {name}")


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_concatenated_batch(ranks):
    expected_parts, expected_grads = reference(*[tiny_model(seed=0)] * 2)
    for result in ranks:
        assert_matches(result, "plain", expected_parts, expected_grads)


@pytest.mark.slow
def test_without_gathering_each_rank_sees_only_its_share(ranks):
    """The control: no gathering gives another loss and other gradients, so the test above can fail."""
    expected_parts, expected_grads = reference(*[tiny_model(seed=0)] * 2)
    assert abs(ranks[0]["alone/loss"].item() - expected_parts["loss"]) > 1e-2
    diffs = [(ranks[0][f"alone/grad/{name}"] - grad).abs().max().item() for name, grad in expected_grads.items()]
    assert max(diffs) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("case", ["grad_cache", "grad_cache_two_towers"])
def test_grad_cache_with_two_processes_and_separate_towers(ranks, case):
    """Two DDP modules, and one DDP module holding both towers (each call encodes one side)."""
    expected_parts, expected_grads = reference(tiny_model(seed=0), tiny_model(seed=7))
    for result in ranks:
        assert_matches(result, case, expected_parts, expected_grads)


@pytest.mark.slow
def test_grad_cache_with_two_processes_and_a_shared_tower(ranks):
    expected_parts, expected_grads = reference(*[tiny_model(seed=0)] * 2)
    for result in ranks:
        assert_matches(result, "grad_cache_shared", expected_parts, expected_grads)


def test_helpers_are_no_ops_in_one_process():
    tensor = torch.arange(6.0).view(3, 2)
    assert distributed.gather_with_grad(tensor) is tensor
    assert distributed.gather_no_grad(tensor) is tensor
    assert distributed.gather_sizes(tensor) == [3]
    assert (distributed.world_size(), distributed.rank(), distributed.rank_offset([3])) == (1, 0, 0)
    assert distributed.rank_offset([3, 2, 4], rank_index=2) == 5
