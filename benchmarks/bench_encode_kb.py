"""`encode` end to end on a synthetic ViQuAE-shaped KB: the KB path alone (forward stubbed) at growing sizes, and the
real encode against the model's forward-only throughput on the same batches.

    python benchmarks/bench_encode_kb.py kb-path --sizes 100000 1000000 --formats jsonl disk parquet
    python benchmarks/bench_encode_kb.py kb-path --sizes 12000000 --formats parquet --dim 64 --workdir /big/disk
    python benchmarks/bench_encode_kb.py kb-path --sizes 100000 --images          # one image per article (~8 passages)
    python benchmarks/bench_encode_kb.py model --passages 2048 [--images]         # end to end / forward-only ratio
    python benchmarks/bench_encode_kb.py first-batch --kb /big/disk/bench-kb-x/kb.parquet   # the command's first batch

KB: passages "Article {a}" (title) + 100 words, 8 passages per article, ids p0..p{n-1}; with --images each article
has one small JPEG (rows of an article share it). Loaded the way users load it: a JSONL file through `datasets`, a
`save_to_disk` folder, or a Parquet file (all via `vl-joint-encoder encode`'s own reader, `read_knowledge_base`).

kb-path: `encode_knowledge_base` with a stub model (returns zeros, no compute) and, by default, a stub tokenizer (one
token per passage), so the time is the KB path: loading the table (`datasets`; a JSONL file is converted to Arrow on
its first load and read from the cache after), reading and validating it (`data.tables`), the image check, the
per-shard fingerprints, the length sort, batching, image loading (--images) and writing shards. Reported per size:
time per passage of each part (flat when it does not grow with the KB size), seconds from the start of
`encode_knowledge_base` (and from the start of loading) to the first batch handed to the model, and memory: the
peak of anonymous memory (RssAnon: Python objects, Arrow buffers, numpy arrays; the memory-mapped Arrow file's
pages are not in it) in each phase, above what the process held before it, and the process's peak RSS (which also
counts mapped file pages that were read, released by the kernel on demand).
`--ids rows` gives integer ids 0..n-1 (the row positions, as ViQuAE's passages) instead of strings "p{row}".
`--dim 64` writes smaller embeddings (the 12M run: 768 float32 dims would be 37 GB of shards).
model: a small T5-shaped JointEncoderModel (d_model 256, 4 layers, 8 heads, max 256 tokens), `encode_knowledge_base`
end to end vs `model.encode` alone on the same (pre-built) batches.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch


WORDS = ("the a of tower bridge river castle painter born city museum song king queen war built year north old "
         "church village empire battle film album team river island school").split()  # fmt: skip


def write_kb(folder: str, n: int, fmt: str, images: bool, seed: int = 0, ids: str = "string") -> str:
    """A synthetic KB of `n` passages in `folder` as `fmt` (jsonl | disk | parquet); returns its path. Ids are
    "p{row}" (`ids="string"`) or the integers 0..n-1 (`ids="rows"`)."""
    import datasets

    rng = np.random.default_rng(seed)
    image_dir = os.path.join(folder, "images")
    if images:
        from PIL import Image

        os.makedirs(image_dir, exist_ok=True)
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        for article in range((n + 7) // 8):
            Image.fromarray(np.roll(pixels, article, axis=0)).save(os.path.join(image_dir, f"{article}.jpg"))
    jsonl = os.path.join(folder, "kb.jsonl")
    word = WORDS.__getitem__
    with open(jsonl, "w") as f:  # the words are plain ASCII: JSON lines written without an escaping pass
        for start in range(0, n, 10_000):
            count = min(10_000, n - start)
            lengths = rng.integers(80, 121, count).tolist()
            block = rng.integers(0, len(WORDS), (count, 120)).tolist()
            lines = []
            for i in range(count):
                row = start + i
                passage_id = f'"p{row}"' if ids == "string" else str(row)
                image = f', "image": "images/{row // 8}.jpg"' if images else ""
                text = " ".join(map(word, block[i][: lengths[i]]))
                lines.append(f'{{"id": {passage_id}, "title": "Article {row // 8}", "text": "{text}"{image}}}\n')
            f.writelines(lines)
    if fmt == "jsonl":
        return jsonl
    table = datasets.load_dataset("json", data_files=jsonl, split="train", cache_dir=os.path.join(folder, "cache"))
    if fmt == "disk":
        path = os.path.join(folder, "kb_disk")
        table.save_to_disk(path)
    else:
        path = os.path.join(folder, "kb.parquet")
        table.to_parquet(path)
    del table
    os.remove(jsonl)
    shutil.rmtree(os.path.join(folder, "cache"), ignore_errors=True)
    return path


class StubModel(torch.nn.Module):
    """No compute: `encode` returns zeros (b, dim). Has what `encode_knowledge_base` reads (config, parameters)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"similarity": "dot", "embedding_dim": dim, "normalize": False,
                                          "feat_dim": None, "_name_or_path": "stub"})()  # fmt: skip

    first_call: float | None = None

    def encode(self, normalize=None, **batch):
        if self.first_call is None:
            self.first_call = time.perf_counter()
        return torch.zeros(batch["input_ids"].shape[0], self.config.embedding_dim)


class StubTokenizer:
    """One token per text: no tokenisation cost; for images returns no pixels (the files are still opened)."""

    def encode_text(self, texts, **kwargs):
        n = len(texts)
        return {"input_ids": torch.ones(n, 1, dtype=torch.long), "attention_mask": torch.ones(n, 1, dtype=torch.long)}

    def __call__(self, text=None, images=None, **kwargs):
        return self.encode_text(text)

    @property
    def tokenizer(self):  # a "processor" (images allowed), distinct from its tokenizer
        return object()


def kb_path(args) -> list[dict]:
    from vl_joint_encoder.data.tables import load_table, read_knowledge_base
    from vl_joint_encoder.retrieval.encode import encode_knowledge_base, kb_columns
    from vl_joint_encoder.utils.memory import AnonymousMemoryPeak, anonymous_memory_mib, peak_rss_mib

    rows = []
    for n in args.sizes:
        for fmt in args.formats:
            folder, path = tempfile.mkdtemp(prefix="bench-kb-", dir=args.workdir), None
            os.environ["HF_DATASETS_CACHE"] = os.path.join(folder, "datasets-cache")  # a cold first load
            try:
                t0 = time.perf_counter()
                path = write_kb(folder, n, fmt, args.images, ids=args.ids)
                t_write = time.perf_counter() - t0
                import datasets

                datasets.config.HF_DATASETS_CACHE = os.environ["HF_DATASETS_CACHE"]
                start = time.perf_counter()
                with AnonymousMemoryPeak() as load_memory:  # what encode does first (data.tables)
                    table = load_table(path, "the KB")
                t_load = time.perf_counter() - start
                t_reload = None
                if fmt != "disk":  # JSON / Parquet -> Arrow conversion happens once; later runs read datasets' cache
                    del table
                    t0 = time.perf_counter()
                    table = load_table(path, "the KB")
                    t_reload = time.perf_counter() - t0
                t0 = time.perf_counter()
                with AnonymousMemoryPeak() as validate_memory:
                    kb = read_knowledge_base(table, kb_columns())
                t_validate = time.perf_counter() - t0
                processor = StubTokenizer() if not args.real_tokenizer else _tokenizer()
                model = StubModel(args.dim)
                t0 = time.perf_counter()
                with AnonymousMemoryPeak() as encode_memory:
                    encode_knowledge_base(model, processor, kb, os.path.join(folder, "out"), batch_size=64,
                                          shard_size=10_000, max_length=256, progress=args.progress,
                                          image_root=folder if args.images else None,
                                          cache_images=not args.no_image_cache)  # fmt: skip
                t_encode = time.perf_counter() - t0
                row = {"passages": n, "format": fmt, "ids": args.ids, "dim": args.dim, "images": args.images,
                       "image_cache": not args.no_image_cache,
                       "tokenizer": "real" if args.real_tokenizer else "stub",
                       "load_s": round(t_load, 1), "reload_s": None if t_reload is None else round(t_reload, 1),
                       "validate_us_per_passage": round(t_validate / n * 1e6, 2),
                       "encode_kb_path_us_per_passage": round(t_encode / n * 1e6, 2),
                       "first_batch_after_encode_start_s": round(model.first_call - t0, 2),
                       "first_batch_after_load_start_s": round(t_load + t_validate + model.first_call - t0, 1),
                       "first_batch_after_cached_load_s": None if t_reload is None
                       else round(t_reload + t_validate + model.first_call - t0, 1),
                       "total_s": round(t_load + t_validate + t_encode, 1), "write_kb_s": round(t_write, 1),
                       "anon_MB_load": round(load_memory.growth_mib),
                       "anon_MB_validate": round(validate_memory.growth_mib),
                       "anon_MB_encode": round(encode_memory.growth_mib), "anon_MB_after": round(anonymous_memory_mib()),
                       "peak_rss_MB": round(peak_rss_mib())}  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
                del kb, table
            finally:
                if args.keep and path is not None:
                    shutil.rmtree(os.path.join(folder, "out"), ignore_errors=True)
                    shutil.rmtree(os.environ["HF_DATASETS_CACHE"], ignore_errors=True)
                    print(f"kept the KB: {path}", flush=True)
                else:
                    shutil.rmtree(folder, ignore_errors=True)
    return rows


def _tokenizer():
    from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer

    return train_vl_t5_tokenizer([" ".join(WORDS)] * 50, vocab_size=120)


def model_ratio(args) -> dict:
    from vl_joint_encoder import JointEncoderConfig, JointEncoderModel
    from vl_joint_encoder.data.inputs import JointEncoderInputBuilder
    from vl_joint_encoder.data.tables import read_knowledge_base
    from vl_joint_encoder.retrieval.encode import _length_order, encode_knowledge_base, kb_columns
    from vl_joint_encoder.retrieval.kb_reader import KBReader

    folder = tempfile.mkdtemp(prefix="bench-kb-", dir=args.workdir)
    try:
        path = write_kb(folder, args.passages, "jsonl", False)
        tokenizer = _tokenizer()
        config = JointEncoderConfig(vocab_size=len(tokenizer), d_model=256, d_kv=32, d_ff=1024, num_layers=4,
                                    num_heads=8, feat_dim=64)  # fmt: skip
        torch.manual_seed(0)
        model = JointEncoderModel(config).eval()
        kb = read_knowledge_base(path, kb_columns())
        # forward only, on the batches encode builds (same shard layout, same length order)
        build = JointEncoderInputBuilder(tokenizer, 256)
        reader, batches = KBReader(kb), []
        for rows in reader.ranges(args.shard_size):
            order = _length_order(rows.texts)
            for start in range(0, len(order), args.batch_size):
                batches.append(build([rows.texts[i] for i in order[start : start + args.batch_size]]))
        results = {}
        for repeat in range(args.repeats):  # interleaved: end to end, forward only
            out = os.path.join(folder, f"out{repeat}")
            t0 = time.perf_counter()
            encode_knowledge_base(model, tokenizer, kb, out, batch_size=args.batch_size, shard_size=args.shard_size,
                                  max_length=256, progress=False)  # fmt: skip
            results.setdefault("end_to_end_s", []).append(time.perf_counter() - t0)
            with torch.no_grad():
                t0 = time.perf_counter()
                for batch in batches:
                    model.encode(**batch)
                results.setdefault("forward_only_s", []).append(time.perf_counter() - t0)
        e2e, fwd = min(results["end_to_end_s"]), min(results["forward_only_s"])
        row = {"passages": args.passages, "threads": torch.get_num_threads(), "end_to_end_s": round(e2e, 2),
               "forward_only_s": round(fwd, 2), "passages_per_s": round(args.passages / e2e, 1),
               "forward_only_over_end_to_end": round(fwd / e2e, 3),
               "model": "JointEncoderModel d_model 256, 4 layers, 8 heads, 256 tokens, fp32 CPU"}  # fmt: skip
        print(json.dumps(row), flush=True)
        return row
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def first_batch(args) -> list[dict]:
    """
    The user's wait: `vl-joint-encoder encode` run as a new process (interpreter start, imports, model load, KB load
    and validation included) on an existing KB file (`--kb`, e.g. one written by `kb-path --keep`), timed from the
    process start to the first progress update of the encode bar with at least one passage encoded; then killed.
    Run twice: a cold `datasets` cache (JSONL / Parquet converted to Arrow first), then the cache of the first run.
    The model is a small random JointEncoderModel (d_model 256, 4 layers) saved with a trained tokenizer.
    """
    import re
    import subprocess
    import sys

    from vl_joint_encoder import JointEncoderConfig, JointEncoderModel

    folder = tempfile.mkdtemp(prefix="bench-first-batch-", dir=args.workdir)
    try:
        tokenizer = _tokenizer()
        config = JointEncoderConfig(vocab_size=len(tokenizer), d_model=256, d_kv=32, d_ff=1024, num_layers=4,
                                    num_heads=8, feat_dim=64)  # fmt: skip
        torch.manual_seed(0)
        model_dir = os.path.join(folder, "model")
        JointEncoderModel(config).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(folder, "datasets-cache"), "HF_HUB_OFFLINE": "1",
               "TQDM_MININTERVAL": "0"}  # fmt: skip
        done = re.compile(r"encode \(rank 0\):[^|]*\|[^|]*\| *([1-9][0-9]*)/")
        rows = []
        for attempt in ("cold datasets cache", "warm datasets cache"):
            command = [sys.executable, "-m", "vl_joint_encoder", "encode", "--model", model_dir, "--kb", args.kb,
                       "--output_dir", os.path.join(folder, f"out-{len(rows)}"), "--cpu"]  # fmt: skip
            start = time.perf_counter()
            process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
            seen, marks, first = "", {}, None
            while first is None:
                chunk = process.stderr.read1(65536).decode(errors="replace") if process.stderr else ""
                if not chunk:
                    break
                seen = (seen + chunk)[-20000:]
                now = time.perf_counter() - start
                for label, pattern in (("load_bar", "Generating train split"), ("encode_bar", "encode (rank 0)")):
                    if label not in marks and pattern in seen:
                        marks[label] = round(now, 1)
                if done.search(seen):
                    first = now
            process.kill()
            process.wait()
            if first is None:
                raise RuntimeError(f"encode ended before its first batch:\n{seen[-3000:]}")
            row = {"kb": args.kb, "attempt": attempt, "first_batch_s": round(first, 1),
                   **{f"{label}_shown_s": value for label, value in marks.items()}}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    kb = sub.add_parser("kb-path", help="forward stubbed: the KB path alone")
    kb.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    kb.add_argument("--formats", nargs="+", default=["jsonl", "disk", "parquet"], choices=["jsonl", "disk", "parquet"])
    kb.add_argument("--images", action="store_true", help="one JPEG per article (8 passages)")
    kb.add_argument("--no_image_cache", action="store_true", help="decode every passage's image (no shard cache)")
    kb.add_argument("--real_tokenizer", action="store_true", help="tokenise for real (a small trained tokenizer)")
    kb.add_argument("--ids", choices=["string", "rows"], default="string", help="ids p0.. (string) or 0..n-1 (rows)")
    kb.add_argument("--dim", type=int, default=768, help="embedding size the stub returns (what the shards hold)")
    kb.add_argument("--progress", action="store_true", help="show encode's progress bars")
    model = sub.add_parser("model", help="end to end vs forward only, small model on CPU")
    model.add_argument("--passages", type=int, default=2048)
    model.add_argument("--batch_size", type=int, default=64)
    model.add_argument("--shard_size", type=int, default=1024)
    model.add_argument("--repeats", type=int, default=2)
    kb.add_argument("--keep", action="store_true", help="keep the KB file written (path printed), for first-batch")
    first = sub.add_parser("first-batch", help="the encode command, from process start to its first batch")
    first.add_argument("--kb", required=True, help="a KB file or save_to_disk folder (e.g. written by kb-path --keep)")
    for p in (kb, model, first):
        p.add_argument("--workdir", default=None, help="where the synthetic KB is written (default: the temp dir)")
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--output", help="write the results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"kb-path": kb_path, "model": model_ratio, "first-batch": first_batch}[args.mode](args)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"results": result, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
