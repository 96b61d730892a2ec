"""Retrieval: embed queries and passages, encode a KB into shards, search them, score runs.

- `embed`: the one model loader, batched `model.encode`, model / KB fingerprints;
- `encode`: the sharded, resumable, multi-process KB encoding job; `store`: its on-disk format;
- `exact_search` (torch top-k with deterministic ties) and `search` (exact or FAISS, with the model's similarity);
- `runs`: run / qrels files; `metrics`: ranx; `evaluator`: `RetrievalEvaluator`, used during training.
"""
