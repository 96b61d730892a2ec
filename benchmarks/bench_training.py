"""Training step time and peak memory: plain in-batch contrastive loss vs GradCache, for growing global batch sizes.

Baseline: the plain step (encode every query and passage with a graph, InBatchContrastiveLoss, backward) on the same
model, batch and device, measured in the same run right before the GradCache step
(`vl_joint_encoder.grad_cache.grad_cache_step`, `--chunk-size` rows per forward). A step = zero_grad + forward +
loss + backward (no optimizer update: it costs the same in both modes). Times: plain and GradCache steps interleaved
in one process (P, G, P, G, ... after a warm-up of each), medians, so machine noise hits both. Peak memory: one step
per mode in a fresh subprocess, so that the peak is its own:
  - CPU: peak resident memory (`ru_maxrss`) minus the resident memory once the model is built;
  - CUDA: `torch.cuda.max_memory_allocated()` minus the memory allocated once the model is built.
Targets: GradCache peak memory flat as the batch grows; GradCache time per sample <= 1.5x plain.

Batch: Q queries (text + 36 region features of dim 2048, as ViQuAE's Faster R-CNN features) and 2Q passages (text,
one positive + one hard negative per query).

    python benchmarks/bench_training.py                                  # "tiny" model, CPU, 1 thread
    python benchmarks/bench_training.py --device cuda --size small --batch-sizes 64 128 256 512 1024 --chunk-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch


SIZES = {
    "tiny": dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4),
    "mini": dict(d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_heads=8),
    "small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),  # t5-small shape
    "base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),  # t5-base shape (VL-T5)
}
QUERY_TEXT, VISUAL_TOKENS, FEAT_DIM, PASSAGE_TEXT = 24, 36, 2048, 64


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_batch(num_queries: int, device: str, generator: torch.Generator) -> dict:
    def text(batch, length):
        input_ids = torch.randint(2, 32000, (batch, length), generator=generator)
        input_ids[:, -1] = 1
        return {"input_ids": input_ids.to(device), "attention_mask": torch.ones(batch, length, device=device)}

    boxes = torch.rand(num_queries, VISUAL_TOKENS, 4, generator=generator).sort(-1).values
    query = {
        **text(num_queries, QUERY_TEXT),
        "visual_feats": torch.randn(num_queries, VISUAL_TOKENS, FEAT_DIM, generator=generator).to(device),
        "visual_pos": boxes[..., [0, 1, 2, 3]].to(device),
    }
    return {
        "query": query,
        "passage": text(2 * num_queries, PASSAGE_TEXT),
        "positive_index": (torch.arange(num_queries) * 2).to(device),
    }


def build(args):
    from vl_joint_encoder import JointEncoderConfig, JointEncoderModel
    from vl_joint_encoder.training.grad_cache import grad_cache_step
    from vl_joint_encoder.training.loss import InBatchContrastiveLoss

    torch.manual_seed(0)
    config = JointEncoderConfig(vocab_size=32200, feat_dim=FEAT_DIM, dropout_rate=args.dropout, **SIZES[args.size])
    model = JointEncoderModel(config).to(args.device).train()
    loss_fn = InBatchContrastiveLoss.from_config(config)
    batch = make_batch(args.batch_size, args.device, torch.Generator().manual_seed(1))
    kwargs = {"positive_index": batch["positive_index"]}

    def step(mode: str) -> None:
        model.zero_grad(set_to_none=False)  # gradients stay allocated: the same in both modes
        if mode == "plain":
            queries = model(**batch["query"]).pooler_output  # (Q, D)
            passages = model(**batch["passage"]).pooler_output  # (2Q, D)
            loss_fn(queries, passages, **kwargs)["loss"].backward()
        else:
            grad_cache_step(model, model, batch["query"], batch["passage"], loss_fn, kwargs, chunk_size=args.chunk_size)

    # gradients allocated before any baseline, so peaks measure activations (what GradCache bounds)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    return step


def timed(step, mode: str, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(mode)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def single(args) -> dict:
    """Runs in its own process. `memory`: one step of `--mode`, peak memory above the built model. `time`: plain and
    GradCache steps interleaved (P, G, P, G, ...) after one warm-up each, so machine noise hits both; medians."""
    step = build(args)
    if args.single == "memory":
        if args.device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = rss_bytes()
        step(args.mode)
        if args.device == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        return {"peak_mib": peak / 2**20}
    times = {"plain": [], "grad_cache": []}
    for repeat in range(args.repeats + 1):
        for mode in times:
            seconds = timed(step, mode, args.device)
            if repeat:  # the first round warms up
                times[mode].append(seconds)
    return {mode: statistics.median(values) for mode, values in times.items()}


def run_single(args, what: str, batch_size: int, mode: str = "plain") -> dict:
    command = [
        sys.executable, __file__, "--single", what, "--mode", mode, "--batch-size", str(batch_size),
        "--size", args.size, "--device", args.device, "--chunk-size", str(args.chunk_size),
        "--repeats", str(args.repeats), "--threads", str(args.threads), "--dropout", str(args.dropout),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{what} {mode} at batch {batch_size} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128], help="queries per step")
    parser.add_argument("--chunk-size", type=int, default=8, help="GradCache rows per forward pass")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout_rate (GradCache replays its masks)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per mode after one warm-up (median)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: stable timings on a shared machine)"
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--single", choices=["memory", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["plain", "grad_cache"], default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.single:
        print(json.dumps(single(args)))
        return 0

    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, device {args.device}, "
          f"{torch.get_num_threads()} threads; model {args.size} {SIZES[args.size]}, dropout {args.dropout}; queries: {QUERY_TEXT} text + "
          f"{VISUAL_TOKENS} visual tokens, passages: {PASSAGE_TEXT} text tokens, 2 per query; chunk {args.chunk_size}")
    header = "| queries | passages | plain s/step | plain ms/query | plain peak MiB | GradCache s/step | " \
             "GradCache ms/query | GradCache peak MiB | time ratio GC/plain | memory ratio GC/plain |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    for batch_size in args.batch_sizes:
        times = run_single(args, "time", batch_size)
        plain = {"step_s": times["plain"], **run_single(args, "memory", batch_size, "plain")}
        cached = {"step_s": times["grad_cache"], **run_single(args, "memory", batch_size, "grad_cache")}
        rows.append({"batch_size": batch_size, "plain": plain, "grad_cache": cached})
        print(
            f"| {batch_size} | {2 * batch_size} | {plain['step_s']:.3f} | {1000 * plain['step_s'] / batch_size:.1f} | "
            f"{plain['peak_mib']:.0f} | {cached['step_s']:.3f} | {1000 * cached['step_s'] / batch_size:.1f} | "
            f"{cached['peak_mib']:.0f} | {cached['step_s'] / plain['step_s']:.2f} | "
            f"{cached['peak_mib'] / max(plain['peak_mib'], 1e-9):.2f} |",
            flush=True,
        )
    if args.json:
        with open(args.json + ".tmp", "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
