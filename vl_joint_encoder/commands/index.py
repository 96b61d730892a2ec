"""`vl-joint-encoder index`: build a FAISS index over encoded shards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from . import command_main


@dataclass
class IndexArguments:
    embeddings: str = field(metadata={"help": "folder written by `vl-joint-encoder encode`"})
    output_dir: str = field(metadata={"help": "where the index is written"})
    kind: Literal["flat", "ivf", "hnsw"] = field(default="flat", metadata={"help": "FAISS index kind"})
    nlist: int = field(default=1024, metadata={"help": "IVF lists"})
    hnsw_m: int = field(default=32, metadata={"help": "HNSW neighbours per node"})


def index(args: IndexArguments) -> int:
    from ..retrieval.search import build_faiss_index, save_faiss_index
    from ..retrieval.store import EmbeddingStore

    store = EmbeddingStore(args.embeddings)
    try:
        built, positions = build_faiss_index(store, args.kind, args.nlist, args.hnsw_m)
    except ImportError:
        raise ValueError("faiss is not installed (pip install faiss-cpu)") from None
    save_faiss_index(built, positions, store, args.output_dir, args.kind)
    print(f"{args.kind} index over {store.count} passages ({store.similarity}) -> {args.output_dir}")
    return 0


main = command_main("vl-joint-encoder index", [IndexArguments], index, "Build a FAISS index over encoded shards.")
