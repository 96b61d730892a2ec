"""GradCache gives the plain loss's value and parameter gradients (plain autograd on the whole batch is the reference)."""

import contextlib

import pytest
import torch
from scripts.tiny_retrieval import contrastive_batch, tiny_model

from vl_joint_encoder.training.grad_cache import RandContext, grad_cache_step, split_inputs
from vl_joint_encoder.training.loss import InBatchContrastiveLoss


def loss_kwargs(batch):
    return {key: batch[key] for key in ("positive_index", "passage_keys", "query_positive_keys")}


def plain_step(query_model, passage_model, batch, loss_fn):
    queries = query_model(**batch["query"]).pooler_output  # (Q, D)
    passages = passage_model(**batch["passage"]).pooler_output  # (P, D)
    parts = loss_fn(queries, passages, **loss_kwargs(batch))
    parts["loss"].backward()
    return {name: value.detach() for name, value in parts.items()}


def gradients(*models):
    grads = {}
    for tower, model in enumerate(models):
        for name, param in model.named_parameters():
            if param.grad is not None:
                grads[f"{tower}.{name}"] = param.grad.clone()
    return grads


def assert_same_gradients(expected, actual):
    assert expected.keys() == actual.keys()
    assert len(expected) > 20  # embeddings, attention, feed-forward, norms, visual embedding, projection
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("towers,similarity", [("shared", "cosine"), ("separate", "dot")])
def test_grad_cache_equals_plain_loss(towers, similarity):
    batch = contrastive_batch(num_queries=7, hard_negatives=1, seed=1)
    query_model = tiny_model(seed=0, similarity=similarity, logit_scale=20.0 if similarity == "cosine" else 1.0)
    passage_model = query_model if towers == "shared" else tiny_model(seed=5, similarity=similarity, logit_scale=1.0)
    models = (query_model,) if towers == "shared" else (query_model, passage_model)
    loss_fn = InBatchContrastiveLoss.from_config(query_model.config)

    expected_parts = plain_step(query_model, passage_model, batch, loss_fn)
    expected = gradients(*models)
    for model in models:
        model.zero_grad(set_to_none=True)

    # chunks of 3 queries (7 = 3 + 3 + 1) and 4 passages (14 = 4 * 3 + 2): uneven last chunks on both sides
    parts = grad_cache_step(
        query_model, passage_model, batch["query"], batch["passage"], loss_fn, loss_kwargs(batch),
        chunk_size=3, passage_chunk_size=4,
    )
    assert parts.keys() == {"loss", "accuracy", "mrr"}
    assert not parts["loss"].requires_grad
    for name in parts:
        torch.testing.assert_close(parts[name], expected_parts[name], atol=1e-6, rtol=1e-5)
    assert_same_gradients(expected, gradients(*models))


def test_dropout_masks_are_replayed(monkeypatch):
    """With dropout on, the re-forward must see the same masks as the first forward: reference = plain autograd over
    the same chunks in the same order from the same seed (so the same masks)."""
    batch = contrastive_batch(num_queries=3, seed=2, passage_images=False)
    model = tiny_model(seed=3, dropout_rate=0.3).train()
    loss_fn = InBatchContrastiveLoss.from_config(model.config)

    torch.manual_seed(11)
    queries = torch.cat([model(**chunk).pooler_output for chunk in split_inputs(batch["query"], 2)])
    passages = torch.cat([model(**chunk).pooler_output for chunk in split_inputs(batch["passage"], 2)])
    expected_loss = loss_fn(queries, passages, **loss_kwargs(batch))["loss"]
    expected_loss.backward()
    expected = gradients(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(11)
    parts = grad_cache_step(model, model, batch["query"], batch["passage"], loss_fn, loss_kwargs(batch), chunk_size=2)
    torch.testing.assert_close(parts["loss"], expected_loss.detach())
    assert_same_gradients(expected, gradients(model))

    # without replaying the RNG state the re-forward draws other masks and the gradients differ: the test can fail
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(RandContext, "restore", lambda self: contextlib.nullcontext())
    torch.manual_seed(11)
    grad_cache_step(model, model, batch["query"], batch["passage"], loss_fn, loss_kwargs(batch), chunk_size=2)
    wrong = gradients(model)
    assert max((wrong[name] - expected[name]).abs().max().item() for name in expected) > 1e-3


def test_loss_scale_and_custom_backward():
    batch = contrastive_batch(num_queries=4, seed=4, passage_images=False)
    model = tiny_model(seed=6)
    loss_fn = InBatchContrastiveLoss.from_config(model.config)
    plain_step(model, model, batch, loss_fn)
    expected = {name: grad / 4 for name, grad in gradients(model).items()}
    model.zero_grad(set_to_none=True)
    calls = []

    def backward_fn(tensor):
        calls.append(tensor.shape)
        tensor.backward()

    grad_cache_step(
        model, model, batch["query"], batch["passage"], loss_fn, loss_kwargs(batch), chunk_size=3,
        backward_fn=backward_fn, loss_scale=0.25,
    )
    # 4 queries in chunks of 3, 8 passages in chunks of 3; one module for both sides: the last query and passage
    # chunks share the final backward (so that a DDP all-reduce reaches both sides)
    assert len(calls) == 2 + 3 - 1
    assert_same_gradients(expected, gradients(model))


def test_split_inputs_errors():
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        split_inputs({"input_ids": torch.zeros(4, 3)}, 0)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        split_inputs({"input_ids": torch.zeros(4, 3), "attention_mask": torch.zeros(5, 3)}, 2)
    chunks = split_inputs({"input_ids": torch.arange(10).view(5, 2), "output_attentions": False}, 2)
    assert [c["input_ids"].shape[0] for c in chunks] == [2, 2, 1]
    assert all(c["output_attentions"] is False for c in chunks)
