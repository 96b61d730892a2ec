"""ViQuAE as published: loading, the passage -> article join, relevance and BM25 columns against hand-made
expectations, the Lucene BM25 formula computed by hand, and bad inputs (clear message, nothing lost)."""

import hashlib
import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
from viquae_handmade import EXPECTED_ORIGINAL, EXPECTED_PROVENANCE, PASSAGES, write_handmade
from viquae_miniature import KB_FILES, RECAT_ORDER, write_viquae_miniature

from vl_joint_encoder.commands.viquae_prepare import main as prepare_main
from vl_joint_encoder.viquae.bm25 import BM25Index, run_from_hits, standard_analyzer
from vl_joint_encoder.viquae.features import GlobalVectorStore
from vl_joint_encoder.viquae.inputs import build_inputs
from vl_joint_encoder.viquae.loading import (
    check_images,
    load_articles,
    load_questions,
    read_viquae_kb,
)
from vl_joint_encoder.viquae.preparation import add_relevance, add_run_columns


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    return write_handmade(tmp_path_factory.mktemp("handmade"))


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    return write_viquae_miniature(tmp_path_factory.mktemp("miniature"), n_articles=12)


def test_questions_and_articles_load_as_published(miniature, tmp_path):
    from_disk, from_jsonl = load_questions(str(miniature["dataset"])), load_questions(str(miniature["dataset_jsonl"]))
    assert list(from_disk) == list(from_jsonl) == ["train", "validation", "test"]
    for split in from_disk:
        assert from_disk[split]["id"] == from_jsonl[split]["id"]
    # the authors' recat: datasets' JSON loader on the three files, concatenated non_humans, humans_with_faces, ...
    kb = datasets.load_dataset("json", data_files={n: str(miniature[n]) for n in KB_FILES}, cache_dir=str(tmp_path))
    recat = datasets.concatenate_datasets([kb[name] for name in RECAT_ORDER])
    articles = load_articles(str(miniature["wikipedia"]))
    assert articles.column_names == ["wikipedia_title", "image"]
    assert articles["wikipedia_title"] == recat["wikipedia_title"] and articles["image"] == recat["image"]
    # a save_to_disk DatasetDict of the three files reads the same
    kb.save_to_disk(str(tmp_path / "kb_dict"))
    assert load_articles(str(tmp_path / "kb_dict"))["image"] == recat["image"]


def test_passage_ids_are_rows_and_images_come_from_the_article(miniature, tmp_path):
    kb = read_viquae_kb(str(miniature["passages"]), str(miniature["wikipedia"]))
    passages = datasets.load_from_disk(str(miniature["passages"]))
    recat = datasets.concatenate_datasets([
        datasets.load_dataset("json", data_files=str(miniature[n]), split="train", cache_dir=str(tmp_path))
        for n in RECAT_ORDER
    ])  # fmt: skip
    assert len(kb) == len(passages) and kb.passage_ids() == [str(r) for r in range(len(passages))]
    expected = [recat[i]["image"] for i in passages["index"]]
    assert list(kb.images()) == expected
    rows = [5, 0, len(kb) - 1]
    texts, images = kb.passages(rows)
    assert texts == [passages[r]["passage"] for r in rows] and images == [expected[r] for r in rows]
    # title handling for T5 / BART tokenizers
    title, _, body = passages[5]["passage"].partition(" [SEP] ")
    replaced = read_viquae_kb(passages, str(miniature["wikipedia"]), title_mode="replace", title_separator=": ")
    assert replaced.passages([5])[0] == [f"{title}: {body}"]
    column = read_viquae_kb(passages, str(miniature["wikipedia"]), title_mode="title_column", title_separator=" | ")
    assert column.passages([5])[0] == [f"{recat[passages[5]['index']]['wikipedia_title']} | {body}"]
    assert column.raw_texts([5]) == [passages[5]["passage"]]  # relevance and BM25 read the stored text
    # the authors' two maps
    assert kb.article2passage[passages[0]["index"]] == [r for r, i in enumerate(passages["index"]) if i == passages[0]["index"]]
    assert kb.title2index[recat[3]["wikipedia_title"]] == 3


def test_global_vectors_are_one_visual_token_joined_through_the_article(handmade, tmp_path):
    import torch
    from conftest import tiny_config_kwargs

    from vl_joint_encoder import JointEncoderConfig, JointEncoderModel
    from vl_joint_encoder.data.inputs import JointEncoderInputBuilder
    from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer

    # the authors' recat with a clip-RN50-like column (one article without vector, as meerqat stores None)
    articles = load_articles(str(handmade["articles"]))
    vectors = [[float(i + 1)] * 6 for i in range(len(articles))]
    vectors[2] = None
    articles = articles.add_column("clip-RN50", vectors)
    articles.save_to_disk(str(tmp_path / "recat"))
    questions = load_questions(str(handmade["questions"]))
    questions = {s: q.add_column("clip-RN50", [[0.5] * 6] * len(q)) for s, q in questions.items()}
    inputs = build_inputs(str(handmade["passages"]), str(tmp_path / "recat"), questions, vectors_column="clip-RN50")
    store = inputs.feature_store
    assert isinstance(store, GlobalVectorStore) and store.dim == 6
    _, images = inputs.kb.passages(range(len(PASSAGES)))
    assert images == ["512px-Ilse_Marovic.jpg"] * 2 + ["512px-Velmora_Lighthouse.jpg"] * 2 + [None] * 2
    assert inputs.question_images["train"] == ["512px-q1.jpg", "512px-q2.jpg", "512px-q3.jpg"]
    # a passage's embedding is the model's on (its text, its article's vector as one token with the whole-image box)
    tokenizer = train_vl_t5_tokenizer([p for p, _ in PASSAGES] * 5, vocab_size=80)
    torch.manual_seed(0)
    model = JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer), feat_dim=6))).eval()
    texts, images = inputs.kb.passages([0])
    batch = JointEncoderInputBuilder(tokenizer, 512, store, None, 6)(texts, images)
    encoded = tokenizer(texts, return_tensors="pt")
    with torch.no_grad():
        expected = model.encode(
            input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
            visual_feats=torch.tensor([[[2.0] * 6]]), visual_pos=torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]),
        )  # fmt: skip
        got = model.encode(**batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_relevance_equals_the_hand_made_expectation(handmade, caplog):
    kb = read_viquae_kb(str(handmade["passages"]), str(handmade["articles"]))
    questions = load_questions(str(handmade["questions"]))
    got_relevant, got_original = {}, {}
    with caplog.at_level("WARNING"):
        for split, table in questions.items():
            table = add_relevance(table, kb, name=f"{split} questions")
            got_relevant.update(zip(table["id"], table["provenance_indices"]))
            got_original.update(zip(table["id"], table["original_answer_provenance_indices"]))
    assert got_relevant == EXPECTED_PROVENANCE and got_original == EXPECTED_ORIGINAL
    assert "1 validation questions cite provenance articles absent" in caplog.text and "q4 ('Nobody Known')" in caplog.text
    with pytest.raises(ValueError, match="q4 .'Nobody Known'.*pass the article files"):
        add_relevance(questions["validation"], kb, on_missing_article="error")


def test_standard_analyzer():
    assert standard_analyzer("Ilse Marovic [SEP] Levi's U.S.A. e-mail 1,000.5 foo_bar 1990-1995 _ x") == [
        "ilse", "marovic", "sep", "levi's", "u.s.a", "e", "mail", "1,000.5", "foo_bar", "1990", "1995", "x"
    ]  # fmt: skip
    assert standard_analyzer("Zoë's Ødegaard") == ["zoë's", "ødegaard"]
    assert standard_analyzer("a" * 300) == ["a" * 255, "a" * 45]


def lucene_bm25(query, documents, k1=0.5, b=0.3):
    """Lucene's BM25Similarity written out (idf = ln(1 + (N - n + .5) / (n + .5)), tf / (tf + k1 (1 - b + b dl /
    avgdl))), over pre-tokenised texts."""
    n_docs, avgdl = len(documents), sum(map(len, documents)) / len(documents)
    scores = []
    for doc in documents:
        score = 0.0
        for term in query:
            tf, df = doc.count(term), sum(term in d for d in documents)
            if tf:
                score += math.log(1 + (n_docs - df + 0.5) / (df + 0.5)) * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        scores.append(score)
    return scores


def test_bm25_scores_are_lucene_bm25_and_negatives_follow_the_authors(handmade):
    kb = read_viquae_kb(str(handmade["passages"]), str(handmade["articles"]))
    texts = kb.raw_texts(range(len(kb)))
    index = BM25Index.build([texts[:4], texts[4:]], len(kb), progress=False)
    questions = load_questions(str(handmade["questions"]))
    train = add_relevance(questions["train"], kb)
    queries = list(train["input"])
    scores, rows = index.search(queries, k=6, progress=False)
    for q, query in enumerate(queries):
        expected = lucene_bm25(standard_analyzer(query), [standard_analyzer(t) for t in texts])
        hits = {int(r): float(s) for r, s in zip(rows[q], scores[q]) if r >= 0}
        assert hits.keys() == {d for d, s in enumerate(expected) if s > 0}  # only passages sharing a term
        for d, s in hits.items():
            assert s == pytest.approx(expected[d], rel=1e-5)
    run = run_from_hits(train["id"], scores, rows)
    # q3 "how many canvases did this painter paint?": passage 1 holds the alias "1,200", not the original answer
    assert "1" in run["q3"]
    authors = add_run_columns(train, run, kb, "BM25", guard="original")
    guarded = add_run_columns(train, run, kb, "BM25", guard="any")
    columns = {q: (p, n) for q, p, n in zip(authors["id"], authors["BM25_provenance_indices"], authors["BM25_irrelevant_indices"])}
    ranked = {q: [int(d) for d in run[q]] for q in run}
    # positives: retrieved passages containing the original answer (else the provenance ones); negatives: the rest
    assert columns["q1"] == ([r for r in ranked["q1"] if r in (0, 3)], [r for r in ranked["q1"] if r not in (0, 3)])
    assert columns["q3"] == ([], ranked["q3"])  # no passage has "one thousand two hundred": no positive
    assert 1 in columns["q3"][1] and 1 not in guarded["BM25_irrelevant_indices"][2]  # the guard drops the alias one
    meerqat = add_run_columns(train, run, kb, "BM25", negatives_order="meerqat")
    assert meerqat["BM25_irrelevant_indices"][0] == list(set(ranked["q1"]) - {0, 3})


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_bad_inputs_fail_clearly_and_write_nothing(handmade, tmp_path, capsys):
    passages = datasets.load_from_disk(str(handmade["passages"]))
    # a passage index outside the 3 articles
    broken = passages.map(lambda row, i: {"index": 7 if i == 4 else row["index"]}, with_indices=True)
    broken.save_to_disk(str(tmp_path / "broken"))
    before = _tree_digest(handmade["root"])
    args = ["--questions", str(handmade["questions"]), "--articles", str(handmade["articles"]),
            "--output", str(tmp_path / "out")]  # fmt: skip
    assert prepare_main(args + ["--passages", str(tmp_path / "broken")]) == 2
    err = capsys.readouterr().err
    assert "1 passages of" in err and "`index` outside the 3 articles (rows 4, index 7)" in err
    assert "pass the article files the passages were built from" in err
    assert not (tmp_path / "out").exists() and _tree_digest(handmade["root"]) == before
    # passages whose index points to other articles than their title prefix says (another article table)
    shifted = passages.map(lambda row: {"index": (row["index"] + 1) % 3})
    with pytest.raises(ValueError, match="do not start with their article's title"):
        read_viquae_kb(shifted, str(handmade["articles"]))
    # a missing image file: named, or skipped with a count
    names = ["512px-Ilse_Marovic.jpg", "512px-nowhere.jpg"]
    with pytest.raises(ValueError, match=r"1 articles reference image files missing .*b: '512px-nowhere.jpg'"):
        check_images(names, str(handmade["images"]), ["a", "b"], "articles")
    assert check_images(names, str(handmade["images"]), ["a", "b"], "articles", "skip") == [names[0], None]


def test_prepare_writes_columns_runs_and_qrels(handmade, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--questions", str(handmade["questions"]), "--articles", str(handmade["articles"]),
            "--passages", str(handmade["passages"]), "--output", str(out), "--k", "4"]  # fmt: skip
    assert prepare_main(args) == 0
    prepared = datasets.load_from_disk(str(out / "questions"))
    for table in prepared.values():
        for item in table:
            assert item["provenance_indices"] == EXPECTED_PROVENANCE[item["id"]]
            assert len(item["BM25_provenance_indices"]) + len(item["BM25_irrelevant_indices"]) <= 4 + 1
    qrels = json.loads((out / "qrels.train.json").read_text())
    assert qrels == {q: {str(r): 1 for r in EXPECTED_PROVENANCE[q]} for q in ("q1", "q2", "q3")}
    run = json.loads((out / "runs" / "bm25.test.json").read_text())
    assert list(run) == ["q5"] and len(run["q5"]) <= 4
    assert datasets.load_from_disk(str(out / "articles"))["wikipedia_title"] == [
        "Velmora Lighthouse", "Ilse Marovic", "Marek Haddad"
    ]  # fmt: skip
    assert np.all(np.diff(list(run["q5"].values())) <= 0)
