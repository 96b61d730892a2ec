"""Exact top-k search (vl_joint_encoder.exact_search) against faiss IndexFlatIP on the same data, in the same run;
and passage-encoding throughput with a tiny model.

    python benchmarks/bench_search.py                       # 1M x 768 float32 (3 GB), CPU
    python benchmarks/bench_search.py --n_passages 250000   # smaller
    python benchmarks/bench_search.py --device cuda         # GPU: also reports the memory bandwidth reached

Baseline: faiss IndexFlatIP.search (exhaustive inner product, BLAS + heap top-k), same threads. Target on CPU: exact
search time <= 1.1 x faiss. Both return the same top-k (checked on each run, ties aside).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from vl_joint_encoder.retrieval.exact_search import auto_chunk_rows, exact_top_k, tensor_chunks


def timed(fn, repeats: int, sync=None) -> float:
    """Best of `repeats` wall-clock seconds (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - start)
    return best


def bench_search(args) -> list[dict]:
    import faiss

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    corpus = torch.randn(args.n_passages, args.dim, generator=generator)  # (N, D) float32
    corpus_dev = corpus.to(device)
    index = faiss.IndexFlatIP(args.dim)
    index.add(corpus.numpy())
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    rows = []
    for n_queries in args.queries:
        queries = torch.randn(n_queries, args.dim, generator=generator)
        queries_dev = queries.to(device)
        chunk_rows = auto_chunk_rows(n_queries)

        def ours(queries_dev=queries_dev, chunk_rows=chunk_rows):
            return exact_top_k(queries_dev, tensor_chunks(corpus_dev, chunk_rows), args.k, "dot", device)

        t_ours = timed(ours, args.repeats, sync)
        queries_np = queries.numpy()
        t_faiss = timed(lambda q=queries_np: index.search(q, args.k), args.repeats)
        _, positions = ours()
        _, faiss_positions = index.search(queries.numpy(), args.k)
        agree = float((positions.cpu().numpy() == faiss_positions).mean())
        gbytes = corpus.numel() * 4 / 1e9
        row = {
            "queries": n_queries,
            "ours_s": round(t_ours, 4),
            "faiss_flat_s": round(t_faiss, 4),
            "ratio_ours_over_faiss": round(t_ours / t_faiss, 3),
            "ours_GB_per_s": round(gbytes / t_ours, 1),
            "ours_TFLOP_per_s": round(2 * n_queries * corpus.numel() / t_ours / 1e12, 3),
            "same_top_k": agree,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_encode(args) -> dict:
    from vl_joint_encoder import JointEncoderConfig, JointEncoderModel
    from vl_joint_encoder.retrieval.embed import embed_batches
    from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer

    words = "the tower bridge river castle painter born city museum song king queen war built year".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, rng.integers(20, 100))) for _ in range(args.encode_passages)]
    tokenizer = train_vl_t5_tokenizer(texts[:200], vocab_size=200)
    config = JointEncoderConfig(vocab_size=len(tokenizer), d_model=256, d_kv=32, d_ff=1024, num_layers=4,
                                num_heads=8, feat_dim=64)  # fmt: skip
    model = JointEncoderModel(config).eval().to(args.device)
    t = timed(lambda: embed_batches(model, tokenizer, texts, batch_size=64, max_length=128), 1)
    result = {"encode_passages_per_s": round(len(texts) / t, 1), "model": "4 layers, d_model 256, <=128 tokens"}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_passages", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encode_passages", type=int, default=512)
    parser.add_argument("--output", help="write the results as JSON")
    args = parser.parse_args()
    if args.threads:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}, "
          f"corpus {args.n_passages} x {args.dim} float32, k={args.k}, device {args.device}")  # fmt: skip
    results = {"search": bench_search(args), "encode": bench_encode(args), "args": vars(args)}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
