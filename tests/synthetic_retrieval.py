"""A small synthetic multimodal retrieval task: the image decides the entity, the question decides the passage.

Entities have made-up names and a fixed random visual feature (V tokens x feat_dim). Each entity has one passage per
attribute ("<name> was born in <year>."); each passage carries its entity's image. A query is a question about one
attribute ("when was this person born?") with the entity's image: only the image tells which entity, only the question
tells which passage of it. A text-only retriever can at best find the right attribute (MRR ~ H_E / E over E entities).
"""

from __future__ import annotations

import numpy as np


ATTRIBUTES = {
    "born": ("when was this person born?", "{name} was born in {value}."),
    "city": ("in which city does this person live?", "{name} lives in the city of {value}."),
    "job": ("what is the job of this person?", "{name} works as a {value}."),
    "pet": ("which animal does this person keep?", "{name} keeps a {value} at home."),
}
VALUES = {
    "born": ["1901", "1923", "1945", "1967", "1989", "1911", "1933", "1955"],
    "city": ["paris", "lima", "oslo", "cairo", "quito", "rome", "tokyo", "accra"],
    "job": ["baker", "pilot", "judge", "nurse", "miner", "tailor", "farmer", "singer"],
    "pet": ["cat", "dog", "parrot", "horse", "goat", "rabbit", "turtle", "hamster"],
}
NAMES = ["zorbla", "quimet", "falvor", "druxen", "pelmira", "vostak", "ilunde", "carbet"]


def make_task(n_entities: int = 8, feat_dim: int = 16, n_visual: int = 4, seed: int = 0):
    """(queries rows, kb rows, feature store {entity key: (n_visual, feat_dim)})."""
    rng = np.random.default_rng(seed)
    store = {f"entity_{e}": rng.normal(size=(n_visual, feat_dim)).astype(np.float32) for e in range(n_entities)}
    kb, queries = [], []
    for e in range(n_entities):
        for a, (question, template) in ATTRIBUTES.items():
            passage_id = f"p_{e}_{a}"
            kb.append({"id": passage_id, "text": template.format(name=NAMES[e], value=VALUES[a][e]), "image": f"entity_{e}"})
            others = [f"p_{e}_{b}" for b in ATTRIBUTES if b != a]
            queries.append(
                {"id": f"q_{e}_{a}", "question": question, "image": f"entity_{e}", "positive_ids": [passage_id],
                 "negative_ids": others[:2]}
            )
    return queries, kb, store


def all_texts(queries, kb):
    return [q["question"] for q in queries] + [p["text"] for p in kb]


def positive_mrr(query_embeddings: np.ndarray, passage_embeddings: np.ndarray, queries, kb) -> float:
    """MRR of each query's first positive over the whole KB: exhaustive cosine scoring in numpy (independent of the
    loss and search code); ties count against the positive."""
    q = query_embeddings / np.linalg.norm(query_embeddings, axis=1, keepdims=True)
    p = passage_embeddings / np.linalg.norm(passage_embeddings, axis=1, keepdims=True)
    scores = q @ p.T
    ids = [x["id"] for x in kb]
    ranks = [int((scores[i] >= scores[i, ids.index(x["positive_ids"][0])]).sum()) for i, x in enumerate(queries)]
    return float(np.mean([1.0 / r for r in ranks]))


def write_training_folder(root, model, tokenizer, queries, kb, store, kb_file: str = "kb.parquet"):
    """What the `train` command reads, in `root`: `model/` (weights and tokenizer), `queries.jsonl`, the KB as
    `kb_file` (.parquet or .jsonl) and `features.npz` (the feature store). Returns `root`."""
    import json

    import datasets

    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with open(root / "queries.jsonl", "w") as handle:
        handle.writelines(json.dumps(query) + "\n" for query in queries)
    if kb_file.endswith(".parquet"):
        datasets.Dataset.from_list(kb).to_parquet(str(root / kb_file))
    else:
        with open(root / kb_file, "w") as handle:
            handle.writelines(json.dumps(passage) + "\n" for passage in kb)
    np.savez(root / "features.npz", **store)
    return root
