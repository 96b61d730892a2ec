"""ViQuAE preparation cost: BM25 (bm25s) indexing / retrieval throughput and peak memory, and the answer matching
of relevance + BM25 negatives, on a synthetic corpus shaped like the ViQuAE passages; extrapolated to the real size
(11.9M passages, 3,697 questions) on one 16-core machine.

    python benchmarks/bench_viquae_prep.py --sizes 50000 100000 200000 --questions 300

The corpus: "<Title> [SEP] " + 100 words per passage (the passages hold at most 100 spaCy tokens): 85% of the words
from 100,000 common words with Zipf frequencies (1/rank), 15% from an unbounded Zipf(1.6) tail (names, numbers), so
that the vocabulary grows with the corpus as real text does; questions of 15 words from the same law. Each size runs in a fresh process (its peak RSS is its own). What scales
how at 11.9M:
- analysis (tokenisation): per passage, parallel over `--workers` processes (16 on the target machine);
- vocabulary ids + bm25s index: per passage, serial (one process) -- linear in the passages;
- retrieval: per question, proportional to the postings read, i.e. to the corpus size; bm25s threads split the
  questions (16 threads);
- memory: the peak RSS's growth per passage, times 11.9M;
- answer matching (relevance over the provenance passages, BM25 columns over the top 100): per question, constant.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


FULL_PASSAGES = 11_895_000  # viquae_v4-alpha_passages: ids up to 11,885,348 in the published qrels
FULL_QUESTIONS = 3_697
TARGET_CORES = 16


COMMON = 100_000  # common words: Zipf 1/rank ("the" ~8% of the tokens, as in English)
RARE_SHARE = 0.15  # names, numbers, rare words: an unbounded Zipf(1.6) tail, so the vocabulary grows with the corpus


def synthetic_texts(n: int, words: int, seed: int, title: bool = True) -> list[str]:
    rng = np.random.default_rng(seed)
    common_p = 1.0 / np.arange(1, COMMON + 1)
    common = rng.choice(COMMON, size=(n, words), p=common_p / common_p.sum())
    rare = COMMON + rng.zipf(1.6, size=(n, words))
    ranks = np.where(rng.random((n, words)) < RARE_SHARE, rare, common)
    texts = []
    for i, row in enumerate(ranks):
        body = " ".join(f"w{r}" for r in row.tolist())
        texts.append(f"Title{i % 97} Name{i // 8} [SEP] {body}." if title else body + "?")
    return texts


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kilobytes


def measure(size: int, n_questions: int) -> dict:
    """One size, in this process."""
    from vl_joint_encoder.viquae.bm25 import BM25Index, standard_analyzer
    from vl_joint_encoder.viquae.relevance import AnswerMatcher

    texts = synthetic_texts(size, 100, seed=size)
    questions = synthetic_texts(n_questions, 15, seed=1, title=False)
    base = peak_rss_gb()
    start = time.perf_counter()
    for text in texts[:20_000]:
        standard_analyzer(text)
    analyze_s = (time.perf_counter() - start) / min(size, 20_000)
    start = time.perf_counter()
    index = BM25Index.build([texts[i : i + 100_000] for i in range(0, size, 100_000)], size, progress=False)
    build_s = time.perf_counter() - start
    index_s = build_s - analyze_s * size  # vocabulary ids + bm25s index (the serial part)
    peak = peak_rss_gb()
    start = time.perf_counter()
    scores, rows = index.search(questions, k=100, n_threads=1, progress=False)
    search_s = (time.perf_counter() - start) / n_questions
    # answer matching per question: ~30 provenance passages (relevance) + 100 retrieved (BM25 columns)
    matcher = AnswerMatcher(["w12345 w7", "w99"], "w12345 w7")
    start = time.perf_counter()
    for q in range(n_questions):
        matcher.find(texts[q * 130 % size : q * 130 % size + 130])
    match_s = (time.perf_counter() - start) / n_questions
    return {"passages": size, "vocabulary": len(index.vocabulary), "analyze_s_per_passage": analyze_s,
            "index_s_per_passage": index_s / size, "build_s": build_s, "search_s_per_question": search_s,
            "match_s_per_question": match_s, "peak_rss_gb": peak, "corpus_rss_gb": base,
            "hits_per_question": float((rows >= 0).sum(axis=1).mean())}  # fmt: skip


def extrapolate(results: list[dict]) -> dict:
    """Linear fits over the measured sizes (slopes: the marginal cost of one more passage; fixed costs such as the
    vocabulary's do not grow with it), applied to the full size."""
    largest = max(results, key=lambda r: r["passages"])
    sizes = np.array([r["passages"] for r in results], dtype=np.float64)

    def slope(values):
        values = np.asarray(values, dtype=np.float64)
        return float(np.polyfit(sizes, values, 1)[0]) if len(results) > 1 else float(values[0] / sizes[0])

    analyze_per_passage = float(np.mean([r["analyze_s_per_passage"] for r in results]))
    index_per_passage = slope([r["build_s"] for r in results]) - analyze_per_passage  # ids + bm25s, serial
    per_passage_gb = slope([r["peak_rss_gb"] - r["corpus_rss_gb"] for r in results])
    search_per_passage = slope([r["search_s_per_question"] for r in results])  # grows with the postings read
    analyze = analyze_per_passage * FULL_PASSAGES / TARGET_CORES
    index = index_per_passage * FULL_PASSAGES
    search = max(search_per_passage * FULL_PASSAGES, largest["search_s_per_question"]) * FULL_QUESTIONS / TARGET_CORES
    match = largest["match_s_per_question"] * FULL_QUESTIONS
    return {"analyze_min": analyze / 60, "index_min": index / 60, "search_min": search / 60, "match_min": match / 60,
            "total_min": (analyze + index + search + match) / 60, "index_peak_gb": per_passage_gb * FULL_PASSAGES,
            "per_passage_kb": per_passage_gb * 1e6, "index_us_per_passage": index_per_passage * 1e6,
            "search_s_per_question_full": search / FULL_QUESTIONS * TARGET_CORES}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000, 200_000])
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.questions)))
        return
    results = []
    for size in args.sizes:
        env = {**os.environ, "DISABLE_TQDM": "1", "OMP_NUM_THREADS": "1"}
        line = subprocess.run([sys.executable, __file__, "--one", str(size), "--questions", str(args.questions)],
                              capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]  # fmt: skip
        results.append(json.loads(line))
        r = results[-1]
        print(f"{size:>9} passages: analyze {1e6 * r['analyze_s_per_passage']:.1f} us/passage, ids+index "
              f"{1e6 * r['index_s_per_passage']:.1f} us/passage ({r['build_s']:.1f} s), search "
              f"{1e3 * r['search_s_per_question']:.2f} ms/question ({r['hits_per_question']:.0f} hits), match "
              f"{1e3 * r['match_s_per_question']:.2f} ms/question, peak RSS {r['peak_rss_gb']:.2f} GB "
              f"(corpus {r['corpus_rss_gb']:.2f} GB), vocabulary {r['vocabulary']}")  # fmt: skip
    full = extrapolate(results)
    print(f"extrapolated to {FULL_PASSAGES:,} passages and {FULL_QUESTIONS:,} questions on {TARGET_CORES} cores: "
          f"analysis {full['analyze_min']:.1f} min ({TARGET_CORES} processes), ids + bm25s index "
          f"{full['index_min']:.1f} min (serial, {full['index_us_per_passage']:.0f} us/passage), retrieval "
          f"{full['search_min']:.1f} min ({full['search_s_per_question_full']:.2f} s/question, {TARGET_CORES} threads), "
          f"answer matching {full['match_min']:.2f} min -> {full['total_min']:.0f} min in all; index memory "
          f"{full['per_passage_kb']:.2f} KB/passage -> peak {full['index_peak_gb']:.0f} GB")  # fmt: skip


if __name__ == "__main__":
    main()
