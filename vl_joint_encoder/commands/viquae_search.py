"""`vl-joint-encoder viquae-search`: a dense run of a trained joint encoder over the ViQuAE passages.

    vl-joint-encoder viquae-search --model trained --questions data/questions --articles data/articles \\
        --embeddings emb/dense --output runs --system dense
    accelerate launch --num_processes 4 -m vl_joint_encoder viquae-search ...   # the KB encoded by 4 processes

Encodes the KB (passage text + its article's image; resumable shards, as `encode`), searches every `--splits`
question (question + its image) and writes `<output>/<system>.<split>.json` (ranx JSON, passage rows as ids).
`--text_only` drops every image on both sides (the text-only system of the same model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from . import command_main
from .viquae_common import ViquaeInputArguments, ViquaeSourceArguments


@dataclass
class ViquaeSearchArguments:
    model: str = field(metadata={"help": "trained model (or separate-towers folder)"})
    embeddings: str = field(metadata={"help": "folder of the KB's embedding shards (resumed if it holds them)"})
    output: str = field(metadata={"help": "folder of the runs: <output>/<system>.<split>.json"})
    system: str = field(default="dense", metadata={"help": "system name in the run file names"})
    splits: list[str] = field(default_factory=lambda: ["validation", "test"], metadata={"help": "question splits"})
    text_only: bool = field(default=False, metadata={"help": "no image on either side"})
    processor: str | None = field(default=None, metadata={"help": "tokenizer / processor folder (default: the model's)"})
    k: int = field(default=100, metadata={"help": "passages per question"})
    batch_size: int = field(default=64, metadata={"help": "questions / passages per forward pass"})
    query_max_length: int = field(default=64, metadata={"help": "max question tokens"})
    passage_max_length: int = field(default=256, metadata={"help": "max passage tokens"})
    shard_size: int = field(default=50_000, metadata={"help": "passages per embedding shard"})
    autocast_dtype: Literal["float32", "float16", "bfloat16"] = field(default="float32", metadata={"help": "on GPU"})
    cpu: bool = field(default=False, metadata={"help": "run on CPU even if a GPU is present"})


def search(sources: ViquaeSourceArguments, inputs: ViquaeInputArguments, args: ViquaeSearchArguments) -> int:
    from accelerate import PartialState

    from ..data.tables import column_values
    from ..retrieval.embed import embed_batches
    from ..retrieval.encode import encode_knowledge_base
    from ..retrieval.runs import to_run, write_run
    from ..retrieval.search import check_model_matches, load_search_models, search_store
    from ..retrieval.store import EmbeddingStore
    from ..viquae.loading import image_root, load_questions

    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    state = PartialState(cpu=args.cpu)
    questions = load_questions(sources.questions, args.splits)
    missing = [split for split in args.splits if split not in questions]
    if missing:
        raise ValueError(f"{sources.questions!r} has no split(s) {missing} (it has {sorted(questions)})")
    viquae = inputs.build(sources, questions, use_images=not args.text_only)
    query_model, passage_model, processor = load_search_models(args.model, args.processor)
    passage_model.to(state.device)
    common = dict(batch_size=args.batch_size, autocast_dtype=args.autocast_dtype, feature_store=viquae.feature_store,
                  image_root=image_root(sources.image_root))  # fmt: skip
    encode_knowledge_base(
        passage_model, processor, viquae.kb, args.embeddings, shard_size=args.shard_size,
        max_length=args.passage_max_length, model_name=args.model, state=state, **common,
    )  # fmt: skip
    if not state.is_main_process:
        return 0
    store = EmbeddingStore(args.embeddings)
    check_model_matches(store.similarity, store.model_hash, passage_model, args.embeddings)
    query_model.to(state.device)
    for split in args.splits:
        queries = viquae.queries(questions[split], split)
        images = None if args.text_only else column_values(queries, "image")
        embeddings = embed_batches(
            query_model, processor, column_values(queries, "input"), images, max_length=args.query_max_length, **common
        )  # (Q, D)
        scores, positions = search_store(embeddings, store, args.k, device=str(state.device))
        path = os.path.join(args.output, f"{args.system}.{split}.json")
        write_run(to_run(column_values(queries, "id"), scores, positions, store.ids), path)
        print(f"{args.system}: {len(queries)} {split} questions over {store.count} passages -> {path}")
    return 0


main = command_main(
    "vl-joint-encoder viquae-search", [ViquaeSourceArguments, ViquaeInputArguments, ViquaeSearchArguments], search,
    "Dense run of a trained joint encoder over the ViQuAE passages (passage images through their article).",
)
