"""
Run by tests/test_distributed_loss.py under a real 2-process `accelerate launch` on CPU (gloo).

Each rank takes its share of one contrastive batch (uneven on purpose: rank 0 gets 3 queries, rank 1 gets 2), encodes
it with a tiny JointEncoderModel wrapped by `accelerator.prepare` (DDP, as the Trainer does), computes
InBatchContrastiveLoss (gathering across processes) and back-propagates with `accelerator.backward`. It saves the loss
parts and the (DDP-averaged) parameter gradients; the test compares them with one process on the concatenated batch.

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/scripts/distributed_loss.py OUTPUT_DIR
"""

import os
import sys

from accelerate import Accelerator
from safetensors.torch import save_file
from tiny_retrieval import TwoTowers, contrastive_batch, slice_batch, tiny_model

from vl_joint_encoder.training.grad_cache import grad_cache_step
from vl_joint_encoder.training.loss import InBatchContrastiveLoss


NUM_QUERIES, HARD_NEGATIVES = 5, 1
SPLIT = [(0, 3), (3, 5)]  # queries per rank: uneven, so padding / offsets are exercised


def loss_kwargs(batch):
    return {key: batch[key] for key in ("positive_index", "passage_keys", "query_positive_keys")}


def collect(prefix, parts, *models):
    tensors = {f"{prefix}/{name}": value.detach().reshape(1).float() for name, value in parts.items()}
    for tower, model in enumerate(models):
        for name, param in model.named_parameters():
            tensors[f"{prefix}/grad/{tower}.{name}"] = param.grad.detach().clone()
    return tensors


def main(output_dir: str) -> None:
    accelerator = Accelerator(cpu=True)
    if accelerator.num_processes != 2:
        raise SystemExit(f"expected 2 processes, got {accelerator.num_processes}: launch with --multi_gpu and the CPU")
    rank = accelerator.process_index
    batch = contrastive_batch(num_queries=NUM_QUERIES, hard_negatives=HARD_NEGATIVES, seed=1)
    local = slice_batch(batch, *SPLIT[rank], group=1 + HARD_NEGATIVES)
    if rank == 1:  # rank 1's queries have one relevant passage each: a narrower (Q, K) exercises the -1 padding
        assert (local["query_positive_keys"][:, 1:] == -1).all()
        local["query_positive_keys"] = local["query_positive_keys"][:, :1]
    out = {}

    # 1. plain step, shared tower, DDP-wrapped
    model = accelerator.prepare(tiny_model(seed=0))
    loss_fn = InBatchContrastiveLoss.from_config(accelerator.unwrap_model(model).config)
    queries = model(**local["query"]).pooler_output  # (Q_r, D)
    passages = model(**local["passage"]).pooler_output  # (P_r, D)
    parts = loss_fn(queries, passages, **loss_kwargs(local))
    accelerator.backward(parts["loss"])
    out.update(collect("plain", parts, accelerator.unwrap_model(model)))

    # 2. the same without gathering: each rank alone (what a plain dist.all_gather or no gather would give)
    model.zero_grad(set_to_none=True)
    alone = InBatchContrastiveLoss.from_config(accelerator.unwrap_model(model).config, gather_across_processes=False)
    parts = alone(model(**local["query"]).pooler_output, model(**local["passage"]).pooler_output, **loss_kwargs(local))
    accelerator.backward(parts["loss"])
    out.update(collect("alone", parts, accelerator.unwrap_model(model)))

    # 3. GradCache with separate towers (two DDP modules), chunks of 2 rows, accelerate's backward and no_sync
    query_model, passage_model = accelerator.prepare(tiny_model(seed=0), tiny_model(seed=7))
    parts = grad_cache_step(
        query_model, passage_model, local["query"], local["passage"], loss_fn, loss_kwargs(local), chunk_size=2,
        backward_fn=accelerator.backward, no_sync=accelerator.no_sync,
    )
    out.update(collect("grad_cache", parts, accelerator.unwrap_model(query_model), accelerator.unwrap_model(passage_model)))

    # 4. GradCache with a shared tower (one DDP module): middle chunks in no_sync, last query + passage chunks together
    model = accelerator.prepare(tiny_model(seed=0))
    parts = grad_cache_step(
        model, model, local["query"], local["passage"], loss_fn, loss_kwargs(local), chunk_size=1,
        backward_fn=accelerator.backward, no_sync=accelerator.no_sync,
    )
    out.update(collect("grad_cache_shared", parts, accelerator.unwrap_model(model)))

    # 5. GradCache with both towers in ONE DDP module that encodes one side per call (a bi-encoder wrapper)
    towers = accelerator.prepare(TwoTowers(tiny_model(seed=0), tiny_model(seed=7)))
    parts = grad_cache_step(
        towers, towers, {**local["query"], "tower": "query"}, {**local["passage"], "tower": "passage"}, loss_fn,
        loss_kwargs(local), chunk_size=2, backward_fn=accelerator.backward, no_sync=accelerator.no_sync,
    )
    unwrapped = accelerator.unwrap_model(towers)
    out.update(collect("grad_cache_two_towers", parts, unwrapped.query, unwrapped.passage))

    path = os.path.join(output_dir, f"rank{rank}.safetensors")
    save_file(out, path + ".tmp")
    os.replace(path + ".tmp", path)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
