"""
Data-parallel training of a joint encoder that is exact in every configuration: `GradientAllReduce`.

Why not `torch.nn.parallel.DistributedDataParallel` (what `Trainer` / accelerate wrap a model in): a retrieval step
encodes queries AND passages with the same module(s) before one backward, and which parameters receive a gradient
depends on the batch (text-only passages leave `visual_embedding` / `img_order_embedding` unused; separate towers
with text-only passages leave the passage tower's visual embedding unused; GradCache re-encodes chunk by chunk).
DDP's reducer is built for one forward per backward with a fixed set of used parameters:
- with `find_unused_parameters=True` (the Trainer's default for this model) two forwards before one backward raise
  `Expected to mark a variable ready only once`;
- with `find_unused_parameters=False` a parameter that is unused on a rank (or on all) makes the reducer fail at
  the next step, or, for separate towers with text-only passages, gives silently wrong gradients (off by ~0.95,
  issue 18).

`GradientAllReduce` keeps the semantics of one process on the concatenated batch by construction:
1. at wrap time the parameters (and buffers) of rank 0 are broadcast, as DDP does;
2. forward passes and backward passes run as in one process (no hooks, no reducer, any number of forwards, GradCache
   chunks, reentrant or not gradient checkpointing, frozen parts);
3. once per optimizer step (the last micro-batch of a gradient-accumulation window), `all_reduce_gradients()`:
   one small all-reduce says which trainable parameters got a gradient on ANY rank; then ONE all-reduce of all those
   gradients, flattened into one buffer (zeros where a rank had none), divided by the world size. A parameter that no
   rank used keeps `grad=None`, exactly as in one process (the optimizer skips it: no weight decay, no Adam state).

Together with `InBatchContrastiveLoss`'s `gather_with_grad` (each rank gets `world_size x` its share of the gradient,
see `distributed.py`), the average is the gradient of one process on the concatenated batch. There is no unused
parameter search at all, so the DDP warning "find_unused_parameters=True was specified ... but did not find any
unused parameters" cannot appear. The cost: communication is not overlapped with the backward (one flat all-reduce
after it), which matters little next to a retrieval step's two encoders and the in-batch gather.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import logging

from .distributed import is_distributed


logger = logging.get_logger(__name__)


class GradientAllReduce(nn.Module):
    """
    Wraps the model the Trainer trains (a `JointEncoderModel` or a `JointEncoderBiEncoder`) for data parallelism:
    `forward` is the model's own; `all_reduce_gradients()` averages the gradients over processes once per step.

    `no_sync()` is accepted (accelerate / the Trainer call it around the micro-batches of gradient accumulation): it
    does nothing, since gradients are only ever reduced by an explicit `all_reduce_gradients()`.
    """

    def __init__(self, module: nn.Module, broadcast: bool = True, autocast=None):
        super().__init__()
        if not is_distributed():
            raise ValueError("GradientAllReduce needs torch.distributed initialised with more than one process")
        self.module = module
        # mixed precision: accelerate applies autocast to the models it prepares; this one it does not prepare
        self._autocast = autocast or contextlib.nullcontext
        if broadcast:
            self.broadcast_from_rank0()

    def forward(self, *args, **kwargs):
        with self._autocast():
            return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        yield

    @torch.no_grad()
    def broadcast_from_rank0(self) -> None:
        """Every rank starts from rank 0's weights (as DDP does at construction)."""
        tensors = list(self.module.parameters()) + list(self.module.buffers())
        if not tensors:
            return
        by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for tensor in tensors:
            by_device.setdefault((tensor.device, tensor.dtype), []).append(tensor)
        for group in by_device.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            offset = 0
            for tensor in group:
                tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [param for param in self.module.parameters() if param.requires_grad]

    @torch.no_grad()
    def all_reduce_gradients(self) -> int:
        """Average the trainable parameters' gradients over processes (two all-reduces in all). Returns the number
        of parameters that got a gradient on some rank."""
        params = self.trainable_parameters()
        if not params:
            return 0
        device = params[0].device
        has_grad = torch.tensor([param.grad is not None for param in params], dtype=torch.float32, device=device)
        dist.all_reduce(has_grad, op=dist.ReduceOp.SUM)  # (n_params,) how many ranks have a gradient
        used = [param for param, count in zip(params, has_grad.tolist()) if count > 0]
        world = dist.get_world_size()
        by_dtype: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
        for param in used:
            by_dtype.setdefault((param.device, param.dtype), []).append(param)
        for group in by_dtype.values():
            flat = torch.cat(
                [(param.grad if param.grad is not None else torch.zeros_like(param)).reshape(-1) for param in group]
            )
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(world)
            offset = 0
            for param in group:
                values = flat[offset : offset + param.numel()].view_as(param)
                if param.grad is None:
                    param.grad = values.clone()
                else:
                    param.grad.copy_(values)
                offset += param.numel()
        return len(used)


def check_supported(trainer) -> None:
    """Refuse, before the first step, what `JointEncoderTrainer` cannot train exactly (see docs/multi_process_training.md).
    `trainer`: a `Trainer` (after its `__init__`: accelerate has read the launch configuration)."""
    import os

    args = trainer.args

    def env_flag(name: str) -> bool:
        return os.environ.get(name, "").lower() in ("1", "true", "yes")

    # from the arguments or the launcher; accelerate may drop the plugin silently (e.g. FSDP on CPU): still refused
    deepspeed = trainer.is_deepspeed_enabled or bool(args.deepspeed) or env_flag("ACCELERATE_USE_DEEPSPEED")
    fsdp = trainer.is_fsdp_enabled or bool(args.fsdp) or env_flag("ACCELERATE_USE_FSDP")
    if deepspeed:
        raise ValueError(
            "JointEncoderTrainer does not support DeepSpeed: a retrieval step encodes queries and passages before one "
            "backward, and DeepSpeed's engine is built for one forward per backward (and does not install on CPU "
            "here, so it is untested). Use plain multi-process training (`accelerate launch --multi_gpu "
            "--num_processes N`) and --grad_cache for memory"
        )
    if fsdp:
        raise ValueError(
            "JointEncoderTrainer does not support FSDP: its exact gradient reduction (one all-reduce per step, for a "
            "step that encodes queries and passages before one backward, with batch-dependent unused parameters) "
            "needs whole parameters on every process, and FSDP is untested with that pattern; the joint encoders "
            "fit on one device. Use plain multi-process training (`accelerate launch --multi_gpu --num_processes N`) "
            "and --grad_cache for memory"
        )


__all__ = ["GradientAllReduce", "check_supported"]
