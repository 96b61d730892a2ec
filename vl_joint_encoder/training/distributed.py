"""
Gathering tensors across data-parallel processes, with and without gradients, for in-batch negatives shared by every
rank (DPR, Karpukhin et al. 2020; CLIP / open_clip; meerqat).

Every function is a no-op (returns its input, sizes `[n]`) when `torch.distributed` is not initialised or the world has
one process, so the same training code runs on one CPU and on many GPUs.

Ranks may hold different numbers of rows (the last batch of an epoch, a dataset not divisible by the world size):
tensors are padded to the largest size for the collective and trimmed after it.

Gradient semantics of `gather_with_grad` (what makes the data-parallel gradient exact): the backward of the gather
SUMS, over ranks, the gradients that each rank's loss sends to a slice, and returns that sum to the slice's owner.
If every rank computes the same loss L on the gathered batch, each rank therefore gets `world_size * dL/d(own rows)`;
DDP / FSDP / DeepSpeed then AVERAGE parameter gradients over ranks, which gives exactly `dL/dparams` of one process
that encoded the whole concatenated batch (the same scheme as open_clip's `gather_with_grad`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when `torch.distributed` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_sizes(tensor: torch.Tensor) -> list[int]:
    """The number of rows (`tensor.shape[0]`) on every rank, in rank order."""
    if not is_distributed():
        return [tensor.shape[0]]
    size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def rank_offset(sizes: list[int], rank_index: int | None = None) -> int:
    """Rows on ranks before `rank_index` (default: this rank): the offset of this rank's rows in the gathered tensor.

    Labels that index this rank's passages (e.g. `positive_index`) must be shifted by it after gathering."""
    rank_index = rank() if rank_index is None else rank_index
    return int(sum(sizes[:rank_index]))


def _padded_all_gather(tensor: torch.Tensor, pad_value: float | int) -> tuple[list[torch.Tensor], list[torch.Size]]:
    """all_gather of tensors whose shapes differ between ranks (same number of dims): pad every dim to the max."""
    world = dist.get_world_size()
    shape = torch.tensor(list(tensor.shape), dtype=torch.long, device=tensor.device)  # (ndim,)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes = [torch.Size(s.tolist()) for s in shapes]
    max_shape = [max(s[d] for s in shapes) for d in range(tensor.dim())]
    padded = tensor.new_full(max_shape, pad_value)
    padded[tuple(slice(0, n) for n in tensor.shape)] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return gathered, shapes


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's rows. Backward: sum the gradient over ranks, keep this rank's slice.

    Written out (rather than `torch.distributed.nn.functional.all_gather`, deprecated in torch 2.13) so that ranks
    with different row counts work and the gradient scaling is explicit. `all_reduce` works on gloo and NCCL."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        gathered, shapes = _padded_all_gather(tensor, 0)
        sizes = [s[0] for s in shapes]
        ctx.start = sum(sizes[: dist.get_rank()])
        ctx.stop = ctx.start + tensor.shape[0]
        return torch.cat([g[:n] for g, n in zip(gathered, sizes)], dim=0)  # (sum(sizes), ...)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous().clone()  # (sum(sizes), ...)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """
    Concatenate `tensor` (n_r, ...) from every rank along dim 0 -> (sum_r n_r, ...), in rank order, with gradients
    flowing back to each rank's own slice (summed over ranks, see the module docstring). Trailing dims must match.
    Returns `tensor` itself when not distributed.
    """
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor, pad_value: float | int = -1) -> torch.Tensor:
    """
    Concatenate `tensor` from every rank along dim 0 without gradients (ids, keys, labels). Other dims may differ
    between ranks: they are padded to the largest with `pad_value` (e.g. `query_positive_keys` (Q, K) with a
    different K per rank, padded with -1). Returns `tensor` itself when not distributed.
    """
    if not is_distributed():
        return tensor
    gathered, shapes = _padded_all_gather(tensor, pad_value)
    return torch.cat([g[: s[0]] for g, s in zip(gathered, shapes)], dim=0)  # (sum_r n_r, max trailing dims...)


__all__ = ["gather_no_grad", "gather_sizes", "gather_with_grad", "is_distributed", "rank", "rank_offset", "world_size"]
