"""Exact search against numpy brute force (ids, scores, ties), FAISS flat, and the encode -> index -> search CLIs."""

import json

import numpy as np
import pytest
import torch
from test_encode import make_kb, saved_model  # noqa: F401 - module fixture reused

from vl_joint_encoder.commands import encode as encode_command
from vl_joint_encoder.commands import evaluate as evaluate_command
from vl_joint_encoder.commands import index as index_command
from vl_joint_encoder.commands import search as search_command
from vl_joint_encoder.retrieval import metrics, runs
from vl_joint_encoder.retrieval.exact_search import exact_top_k, tensor_chunks


def brute_force(queries, passages, k, similarity):
    """numpy reference: float64 scores, order by (score desc, row asc) via lexsort."""
    q, p = queries.astype(np.float64), passages.astype(np.float64)
    if similarity == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        p = p / np.linalg.norm(p, axis=1, keepdims=True)
    scores = q @ p.T
    order = np.stack([np.lexsort((np.arange(len(p)), -row))[:k] for row in scores])
    return np.take_along_axis(scores, order, 1), order


def sign_vectors(n, generator, dim=8, nonzero=4):
    signs = torch.randint(0, 2, (n, dim), generator=generator).float() * 2 - 1
    keep = torch.rand(n, dim, generator=generator).argsort(dim=1) < nonzero
    return signs * keep


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("chunk_rows,k", [(1000, 10), (37, 10), (7, 25), (64, 300)])
def test_exact_equals_numpy_with_ties(similarity, chunk_rows, k):
    generator = torch.Generator().manual_seed(0)
    # small integer vectors: many exact ties, also across chunk boundaries and at the k-th place. For cosine, vectors
    # with four +-1 entries (norm 2) scaled by powers of 2: normalisation and scores are exact in float32, ties stay ties
    if similarity == "dot":
        passages = torch.randint(-2, 3, (300, 8), generator=generator).float()
        queries = torch.randint(-2, 3, (9, 8), generator=generator).float() + 0.5
    else:
        passages, queries = [
            sign_vectors(n, generator) * 2.0 ** torch.randint(0, 4, (n, 1), generator=generator) for n in (300, 9)
        ]
    passages[100:110] = passages[5]  # duplicated passages: identical scores
    scores, positions = exact_top_k(queries, tensor_chunks(passages, chunk_rows), k, similarity)
    ref_scores, ref_positions = brute_force(queries.numpy(), passages.numpy(), k, similarity)
    assert positions.tolist() == ref_positions.tolist()
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-5, atol=1e-5)


def test_cosine_is_not_dot():
    """A long passage vector wins the dot product but not the cosine: the search must follow the similarity."""
    passages = torch.tensor([[10.0, 1.0], [1.0, 1.0]])
    query = torch.tensor([[1.0, 1.0]])
    assert exact_top_k(query, tensor_chunks(passages, 2), 1, "dot")[1].item() == 0
    assert exact_top_k(query, tensor_chunks(passages, 2), 1, "cosine")[1].item() == 1


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_faiss_flat_same_top_k(similarity):
    faiss = pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(1)
    passages, queries = torch.randn(2000, 16, generator=generator), torch.randn(20, 16, generator=generator)
    scores, positions = exact_top_k(queries, tensor_chunks(passages, 300), 50, similarity)
    p, q = passages.numpy().copy(), queries.numpy().copy()
    if similarity == "cosine":
        faiss.normalize_L2(p)
        faiss.normalize_L2(q)
    index = faiss.IndexFlatIP(16)
    index.add(p)
    faiss_scores, faiss_positions = index.search(q, 50)
    assert positions.tolist() == faiss_positions.tolist()
    np.testing.assert_allclose(scores.numpy(), faiss_scores, rtol=1e-5, atol=1e-5)


def test_bad_search_inputs():
    with pytest.raises(ValueError, match="corpus is empty"):
        exact_top_k(torch.randn(2, 4), iter([]), 3, "dot")
    with pytest.raises(ValueError, match="dimension 5 but queries have 4"):
        exact_top_k(torch.randn(2, 4), tensor_chunks(torch.randn(3, 5), 2), 3, "dot")
    # k larger than the corpus: everything, ranked
    scores, positions = exact_top_k(
        torch.ones(1, 2), tensor_chunks(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), 1), 5, "dot"
    )
    assert positions.tolist() == [[1, 0]] and scores.tolist() == [[2.0, 1.0]]


def test_encode_index_search_evaluate_clis(saved_model, tmp_path, capsys):  # noqa: F811
    model_path, model, tokenizer = saved_model
    kb = make_kb(60)
    (tmp_path / "kb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kb))
    queries = [{"id": f"q{i}", "question": kb[i * 7]["text"]} for i in range(6)]  # each query = a passage text
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    qrels = {f"q{i}": {f"p{i * 7}": 1} for i in range(6)}
    (tmp_path / "qrels.json").write_text(json.dumps(qrels))
    common = ["--model", model_path]
    assert encode_command.main(common + ["--kb", str(tmp_path / "kb.jsonl"), "--output_dir", str(tmp_path / "emb"),
                                 "--shard_size", "16", "--batch_size", "8", "--cpu"]) == 0  # fmt: skip
    search_args = common + ["--queries", str(tmp_path / "queries.jsonl"), "--embeddings", str(tmp_path / "emb")]
    assert search_command.main(search_args + ["--output", str(tmp_path / "run.json"), "--k", "100"]) == 0
    assert search_command.main(search_args + ["--output", str(tmp_path / "run.trec"), "--k", "5"]) == 0
    run = json.loads((tmp_path / "run.json").read_text())
    # reference: embed with the model directly, numpy brute-force cosine
    with torch.no_grad():
        kb_emb = torch.cat([model(**tokenizer([r["text"]], return_tensors="pt")).pooler_output for r in kb]).numpy()
        q_emb = torch.cat([model(**tokenizer([q["question"]], return_tensors="pt")).pooler_output for q in queries])
    ref_scores, ref_order = brute_force(q_emb.numpy(), kb_emb, 60, "cosine")
    for i, query in enumerate(queries):
        assert len(run[query["id"]]) == 60  # k=100 > KB size
        assert list(run[query["id"]]) == [kb[j]["id"] for j in ref_order[i]]
        np.testing.assert_allclose(list(run[query["id"]].values()), ref_scores[i], atol=1e-5)
    trec = runs.load_run(tmp_path / "run.trec")
    assert {q: list(d) for q, d in trec.items()} == {q: list(d)[:5] for q, d in run.items()}
    assert evaluate_command.main(["--run", str(tmp_path / "run.json"), "--qrels", str(tmp_path / "qrels.json")]) == 0
    assert metrics.evaluate(qrels, run, ["mrr@10"])["mrr@10"] == 1.0  # each query is its passage's text

    pytest.importorskip("faiss")
    assert index_command.main(["--embeddings", str(tmp_path / "emb"), "--output_dir", str(tmp_path / "flat")]) == 0
    assert (
        search_command.main(search_args + ["--index", str(tmp_path / "flat"), "--output", str(tmp_path / "f.json")])
        == 0
    )
    faiss_run = json.loads((tmp_path / "f.json").read_text())
    assert {q: list(d)[:10] for q, d in faiss_run.items()} == {q: list(d)[:10] for q, d in run.items()}
    assert index_command.main(["--embeddings", str(tmp_path / "emb"), "--output_dir", str(tmp_path / "hnsw"),
                              "--kind", "hnsw"]) == 0  # fmt: skip
    assert index_command.main(["--embeddings", str(tmp_path / "emb"), "--output_dir", str(tmp_path / "ivf"),
                              "--kind", "ivf", "--nlist", "4"]) == 0  # fmt: skip
    assert search_command.main(search_args + ["--index", str(tmp_path / "ivf"), "--output", str(tmp_path / "i.json"),
                                             "--nprobe", "4"]) == 0  # fmt: skip
    ivf_run = json.loads((tmp_path / "i.json").read_text())
    assert all(list(ivf_run[q])[0] == list(run[q])[0] for q in run)  # nprobe = nlist: exhaustive

    # refusals: another model, queries whose images are missing, bad k
    capsys.readouterr()
    other = type(model)(model.config)
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    argv = ["--model", str(tmp_path / "other")] + search_args[2:] + ["--output", str(tmp_path / "x.json")]
    assert search_command.main(argv) == 2
    assert "encoded by another model" in capsys.readouterr().err
    with_images = [{"id": "q0", "question": "x", "image": str(tmp_path / "nope.jpg")}]
    (tmp_path / "img_queries.jsonl").write_text(json.dumps(with_images[0]) + "\n")
    argv = common + ["--queries", str(tmp_path / "img_queries.jsonl"), "--embeddings", str(tmp_path / "emb")]
    assert search_command.main(argv + ["--output", str(tmp_path / "y.json")]) == 2
    assert "1 queries have no image" in capsys.readouterr().err
    assert search_command.main(search_args + ["--output", str(tmp_path / "z.json"), "--k", "0"]) == 2


def test_retrieval_evaluator(saved_model):  # noqa: F811
    from vl_joint_encoder.retrieval.evaluator import RetrievalEvaluator

    _, model, tokenizer = saved_model
    kb = make_kb(40)
    queries = [{"id": f"q{i}", "question": kb[i * 3]["text"], "positive_ids": [f"p{i * 3}"]} for i in range(8)]
    evaluator = RetrievalEvaluator(queries, kb, tokenizer, metrics=["mrr@10", "precision@1", "recall@5"], batch_size=8)
    # independent reference: each query is its passage's text, so the positive is the exact nearest neighbour
    assert evaluator(model) == {"mrr@10": 1.0, "precision@1": 1.0, "recall@5": 1.0}
    assert evaluator(model, model) == evaluator(model)
    # a different query tower: same code path, metrics from the search run, equal to ranx-convention ir_metrics
    other = type(model)(model.config).eval()
    run = evaluator.run(other, model)
    assert evaluator(other, model) == metrics.evaluate(evaluator.qrels, run, evaluator.metrics)
    with pytest.raises(ValueError, match="unknown metric"):
        RetrievalEvaluator(queries, kb, tokenizer, metrics=["mrr10"])


@pytest.mark.parametrize("chunk_rows", [5000, 4096, 999, 50])
def test_single_query_ties_at_the_cut_keep_row_order(chunk_rows):
    """One query over a corpus where every score ties (identical passages) or a block of ties straddles the k-th
    place: the top-k is the lowest rows among the tied, in row order, whatever the chunking (numpy lexsort reference)."""
    generator = torch.Generator().manual_seed(1)
    passages = torch.ones(5000, 4)
    scores, positions = exact_top_k(torch.ones(1, 4), tensor_chunks(passages, chunk_rows), 100, "dot")
    assert positions[0].tolist() == list(range(100)) and bool((scores == 4).all())
    passages = torch.randint(-1, 2, (5000, 4), generator=generator).float()
    query = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    _, positions = exact_top_k(query, tensor_chunks(passages, chunk_rows), 700, "dot")
    assert positions.tolist() == brute_force(query.numpy(), passages.numpy(), 700, "dot")[1].tolist()
