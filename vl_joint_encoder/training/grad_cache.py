"""
GradCache (Gao et al. 2021, https://arxiv.org/abs/2101.06983): a contrastive loss over a batch far larger than fits
in memory, with the SAME loss value and gradients as the plain loss, at the memory of one chunk.

The loss depends on the encoders only through the embeddings, so

    dL/dtheta = sum_i (dL/de_i) . (de_i/dtheta)

1. encode every chunk WITHOUT a graph, remembering each chunk's RNG state (dropout masks must be the same later);
2. compute the loss on all the (gathered) embeddings, and its gradient with respect to the embeddings only (cheap);
3. re-encode each chunk WITH a graph under its saved RNG state and back-propagate `(embeddings * cached_grad).sum()`,
   whose gradient is exactly the chunk's share of dL/dtheta. Parameter gradients accumulate over chunks.

Costs one extra forward pass (about +33% compute over forward + backward) for memory flat in the batch size.
Works with shared (one model) or separate query / passage towers, with `InBatchContrastiveLoss` gathering across
processes (each rank chunks its own share; the gather happens once, in step 2), under DDP (every backward but the
last of each model runs in `no_sync`, so gradients are all-reduced once; with one module for both sides, the last
query and passage chunks share that last backward so it reaches both towers), and with `accelerate`
(`backward_fn=accelerator.backward`, `no_sync=accelerator.no_sync`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import get_device_states, set_device_states


class RandContext:
    """Captures the CPU and accelerator RNG states at creation; `with ctx.restore():` replays them, then leaves the
    global RNG where it was (as GradCache's `RandContext` and torch.utils.checkpoint do)."""

    def __init__(self, *tensors: torch.Tensor):
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)

    @contextlib.contextmanager
    def restore(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu_state)
            set_device_states(self.devices, self.device_states)
            yield


def default_embed(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """`model(**inputs).pooler_output` (B, D): the joint encoder's retrieval embedding."""
    return model(**inputs, return_dict=True).pooler_output


def split_inputs(inputs: Mapping[str, Any], chunk_size: int) -> list[dict[str, Any]]:
    """Split a dict of model inputs along the batch dim (dim 0 of every tensor) into chunks of `chunk_size` rows.
    Non-tensor values (flags) are copied to every chunk."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (rows per forward pass), got {chunk_size!r}")
    sizes = {key: value.shape[0] for key, value in inputs.items() if isinstance(value, torch.Tensor) and value.dim()}
    if not sizes:
        raise ValueError(f"model inputs hold no batched tensor to chunk (keys: {sorted(inputs)})")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"model inputs disagree on the batch size (dim 0): {sizes}")
    batch_size = next(iter(sizes.values()))
    return [
        {key: value[start : start + chunk_size] if key in sizes else value for key, value in inputs.items()}
        for start in range(0, batch_size, chunk_size)
    ]


def _default_no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def _first_tensors(inputs: Mapping[str, Any]) -> list[torch.Tensor]:
    return [value for value in inputs.values() if isinstance(value, torch.Tensor)]


def grad_cache_step(
    query_model: nn.Module,
    passage_model: nn.Module,
    query_inputs: Mapping[str, Any],
    passage_inputs: Mapping[str, Any],
    loss_fn: Callable[..., dict[str, torch.Tensor] | torch.Tensor],
    loss_kwargs: Mapping[str, Any] | None = None,
    chunk_size: int = 32,
    passage_chunk_size: int | None = None,
    backward_fn: Callable[[torch.Tensor], None] | None = None,
    loss_scale: float = 1.0,
    no_sync: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None,
    embed_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] = default_embed,
) -> dict[str, torch.Tensor]:
    """
    One GradCache training step: accumulates into `.grad` of both models exactly the gradients that
    `backward_fn(loss_scale * loss_fn(embed(query_model, query_inputs), embed(passage_model, passage_inputs),
    **loss_kwargs)["loss"])` would, encoding at most `chunk_size` rows at a time. Does not step the optimizer.

    Args:
        query_model, passage_model: the towers (the same module for shared towers; DDP-wrapped is fine).
        query_inputs, passage_inputs: model inputs (dicts of tensors with the batch on dim 0), e.g. a collator's
            `batch["query"]` and `batch["passage"]`.
        loss_fn: called as `loss_fn(query_embeddings (Q, D), passage_embeddings (P, D), **loss_kwargs)`; returns a
            dict with a differentiable `loss` (e.g. `InBatchContrastiveLoss`) or the loss tensor itself.
        loss_kwargs: e.g. `positive_index`, `passage_keys`, `query_positive_keys`, `num_items_in_batch`.
        chunk_size: rows per forward pass for queries (and passages unless `passage_chunk_size`).
        backward_fn: how to back-propagate a scalar through a model (default `Tensor.backward`); pass
            `accelerator.backward` under accelerate / the Trainer so mixed-precision scaling applies.
        loss_scale: multiplies the gradients (not the returned loss), e.g. `1 / gradient_accumulation_steps`.
        no_sync: `model -> context manager` that suspends gradient all-reduce (default: `model.no_sync()` for DDP
            modules); `accelerator.no_sync` under accelerate. Each model's last chunk backward runs outside it.
        embed_fn: `(model, inputs) -> (B, D)` embeddings; default `model(**inputs).pooler_output`.

    Returns:
        The loss parts (`loss`, and e.g. `accuracy`, `mrr`), detached and unscaled.

    Call it inside the same autocast context as a plain step would (the Trainer's `compute_loss_context_manager`).

    Example (in a `Trainer.training_step`):
        ```python
        parts = grad_cache_step(model, model, inputs["query"], inputs["passage"], self.loss_fn,
                                dict(positive_index=inputs["positive_index"], passage_keys=inputs["passage_keys"],
                                     query_positive_keys=inputs["query_positive_keys"]),
                                chunk_size=self.args.grad_cache_chunk_size, backward_fn=self.accelerator.backward,
                                loss_scale=1 / self.current_gradient_accumulation_steps,
                                no_sync=self.accelerator.no_sync)
        return parts["loss"] / self.current_gradient_accumulation_steps
        ```
    """
    backward_fn = backward_fn or (lambda tensor: tensor.backward())
    no_sync = no_sync or _default_no_sync
    query_chunks = split_inputs(query_inputs, chunk_size)
    passage_chunks = split_inputs(passage_inputs, passage_chunk_size or chunk_size)
    work = [(query_model, chunk) for chunk in query_chunks] + [(passage_model, chunk) for chunk in passage_chunks]

    # 1. embeddings without a graph, with each chunk's RNG state
    states, embeddings = [], []
    with torch.no_grad():
        for model, chunk in work:
            states.append(RandContext(*_first_tensors(chunk)))
            embeddings.append(embed_fn(model, chunk))  # (chunk, D)
    num_query_chunks = len(query_chunks)
    query_embeddings = torch.cat(embeddings[:num_query_chunks]).requires_grad_()  # (Q, D) leaf
    passage_embeddings = torch.cat(embeddings[num_query_chunks:]).requires_grad_()  # (P, D) leaf

    # 2. loss and its gradient with respect to the embeddings (the gather across ranks, if any, happens here)
    with torch.enable_grad():
        parts = loss_fn(query_embeddings, passage_embeddings, **(loss_kwargs or {}))
        if isinstance(parts, torch.Tensor):
            parts = {"loss": parts}
        query_grad, passage_grad = torch.autograd.grad(parts["loss"] * loss_scale, [query_embeddings, passage_embeddings])
    cached_grads = list(query_grad.split([len(e) for e in embeddings[:num_query_chunks]])) + list(
        passage_grad.split([len(e) for e in embeddings[num_query_chunks:]])
    )

    # 3. chunk-wise re-forward with a graph under the saved RNG state; backward of <embedding, cached gradient>.
    # Gradients are synchronised (DDP all-reduce) only in the last backward through each model. That backward must
    # reach every parameter the model trains, so with ONE module for both sides (a shared tower, or a module holding
    # both towers and encoding one side per call) the last query chunk and the last passage chunk are re-encoded
    # together and back-propagated in a single synchronised backward.
    groups = [[index] for index in range(len(work))]
    if query_model is passage_model and len(work) > 1:
        last_query, last_passage = num_query_chunks - 1, len(work) - 1
        groups = [[i] for i in range(len(work)) if i not in (last_query, last_passage)] + [[last_query, last_passage]]
    last_group = {id(work[index][0]): number for number, group in enumerate(groups) for index in group}
    for number, group in enumerate(groups):
        model = work[group[0]][0]
        sync = contextlib.nullcontext() if last_group[id(model)] == number else no_sync(model)
        with sync, torch.enable_grad():
            surrogate = 0.0
            for index in group:
                with states[index].restore():
                    chunk_embeddings = embed_fn(model, work[index][1])  # (chunk, D)
                grad = cached_grads[index].to(chunk_embeddings.dtype)
                surrogate = surrogate + (chunk_embeddings * grad).sum()  # d surrogate / d embeddings = grad
            backward_fn(surrogate)
    return {name: value.detach() for name, value in parts.items()}


__all__ = ["RandContext", "default_embed", "grad_cache_step", "split_inputs"]
