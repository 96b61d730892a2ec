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
