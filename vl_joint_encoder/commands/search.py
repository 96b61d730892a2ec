"""`vl-joint-encoder search`: top-k search of queries over an encoded KB (exact, or a FAISS index)."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import command_main


@dataclass
class SearchArguments:
    model: str = field(metadata={"help": "the model (or separate-towers folder) that encoded the KB"})
    queries: str = field(metadata={"help": "queries file / folder: id, question, optional image"})
    embeddings: str = field(metadata={"help": "folder written by `vl-joint-encoder encode`"})
    output: str = field(metadata={"help": "run file: .json (ranx) or anything else (TREC)"})
    index: str | None = field(
        default=None,
        metadata={"help": "FAISS index folder written by `vl-joint-encoder index` (default: exact search)"},
    )
    k: int = field(default=100, metadata={"help": "passages per query"})
    processor: str | None = field(
        default=None, metadata={"help": "tokenizer / processor folder (default: the model's)"}
    )
    batch_size: int = field(default=64, metadata={"help": "queries per forward pass"})
    max_length: int = field(default=256, metadata={"help": "max query tokens"})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: cuda when available)"})
    id_column: str = field(default="id", metadata={"help": "query id column"})
    question_column: str = field(default="question", metadata={"help": "question column"})
    image_column: str = field(default="image", metadata={"help": "query image column (optional)"})
    feature_store: str | None = field(
        default=None,
        metadata={
            "help": "precomputed visual features (.npz / .safetensors / .h5, or an extract-features folder); "
            "query images that are its keys use them"
        },
    )
    image_root: str | None = field(default=None, metadata={"help": "folder that relative image paths are relative to"})
    nprobe: int = field(default=32, metadata={"help": "IVF lists visited per query (FAISS ivf index)"})
    verify: bool = field(
        default=False,
        metadata={"help": "check every shard's sha256 before searching (default: sizes and the manifest's checksum)"},
    )


def search(args: SearchArguments) -> int:
    import torch

    from ..data.feature_stores import open_feature_store
    from ..data.references import check_image_references
    from ..data.tables import ColumnMapping, read_queries
    from ..retrieval.embed import embed_batches
    from ..retrieval.runs import to_run, write_run
    from ..retrieval.search import check_model_matches, faiss_search, load_search_models, search_store
    from ..retrieval.store import EmbeddingStore

    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    store = EmbeddingStore(args.embeddings, verify=args.verify)
    query_model, passage_model, processor = load_search_models(args.model, args.processor)
    check_model_matches(store.similarity, store.model_hash, passage_model, args.embeddings)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    query_model.to(device)
    feature_store = open_feature_store(args.feature_store)
    columns = ColumnMapping(query_id=args.id_column, question=args.question_column, query_image=args.image_column)
    queries = read_queries(args.queries, columns)
    check_image_references(queries.ids, queries.images, feature_store, args.image_root, "queries", require_all=True)
    embeddings = embed_batches(
        query_model,
        processor,
        queries.questions,
        queries.images,
        args.batch_size,
        args.max_length,
        feature_store=feature_store,
        image_root=args.image_root,
    )
    if args.index:
        scores, positions, _ = faiss_search(args.index, embeddings, args.k, nprobe=args.nprobe, store=store)
    else:
        scores, positions = search_store(embeddings, store, args.k, device=device)
    write_run(to_run(queries.ids, scores, positions, store.ids), args.output)
    print(
        f"searched {len(queries)} queries over {store.count} passages (top {min(args.k, store.count)}) -> {args.output}"
    )
    return 0


main = command_main(
    "vl-joint-encoder search", [SearchArguments], search, "Top-k search of queries over an encoded KB."
)
