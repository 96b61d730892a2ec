import json

import datasets
import numpy as np
import pytest
from PIL import Image

from vl_joint_encoder.data.feature_stores import open_feature_store
from vl_joint_encoder.data.tables import ColumnMapping, load_table, prepare_training_data


def viquae_like():
    """Rows with ViQuAE's own column names and nesting (KILT-style `output`, passage `index` = row position)."""
    queries = datasets.Dataset.from_list(
        [
            {"id": "q0", "input": "what brand did this singer's song advertise?", "image": "Jackie_Wilson.jpg",
             "url": "http://x", "output": {"original_answer": "Levi's", "answer": ["Levi's", "Levis"]},
             "kilt_id": "k0", "wikidata_id": "Q1", "provenance_indices": [3, 5],
             "BM25_provenance_indices": [3], "BM25_irrelevant_indices": [1, 3, 4]},
            {"id": "q1", "input": "where was this tower built?", "image": "Eiffel.jpg", "url": "http://y",
             "output": {"original_answer": "Paris", "answer": ["Paris"]}, "kilt_id": "k1", "wikidata_id": "Q2",
             "provenance_indices": [], "BM25_provenance_indices": [], "BM25_irrelevant_indices": [0, 2]},
            {"id": "q2", "input": "when did this man die?", "image": "Lincoln.jpg", "url": "http://z",
             "output": {"original_answer": "1865", "answer": ["1865"]}, "kilt_id": "k2", "wikidata_id": "Q3",
             "provenance_indices": [0], "BM25_provenance_indices": [0], "BM25_irrelevant_indices": [2, 6]},
        ]
    )
    passages = datasets.Dataset.from_dict(
        {"passage": [f"passage number {i}" for i in range(7)], "index": list(range(7))}
    )
    return queries, passages


def test_viquae_columns_read_as_is():
    queries, passages = viquae_like()
    data = prepare_training_data(queries, passages, ColumnMapping.viquae())
    rows = data.queries
    assert rows["query_id"] == ["q0", "q2"]  # q1 has no provenance passage: skipped and counted
    assert data.stats.n_skipped_no_positive == 1
    assert rows["question"][0] == "what brand did this singer's song advertise?"
    assert rows["image"] == ["Jackie_Wilson.jpg", "Lincoln.jpg"]
    assert rows["positive_rows"] == [[3, 5], [0]]
    # the irrelevant index 3 is a positive of q0 (weak relevance): never a negative of q0
    assert rows["negative_rows"] == [[1, 4], [2, 6]]
    assert data.passages([5, 0])[0] == ["passage number 5", "passage number 0"]
    # another provenance system's columns, and the index column absent (row positions)
    data = prepare_training_data(
        queries, passages.remove_columns("index"), ColumnMapping.viquae("BM25_provenance_indices", None)
    )
    assert data.queries["positive_rows"] == [[3], [0]] and data.queries["negative_rows"] == [[], []]


def test_generic_files_with_string_ids(tmp_path):
    kb = [{"id": f"doc-{i}", "text": f"text {i}"} for i in range(4)][::-1]  # ids are not row positions
    queries = [{"id": 7, "question": "q?", "positive_ids": ["doc-1"], "negative_ids": ["doc-3", "doc-2"]}]
    with open(tmp_path / "queries.jsonl", "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in queries)
    datasets.Dataset.from_list(kb).to_parquet(str(tmp_path / "kb.parquet"))
    data = prepare_training_data(str(tmp_path / "queries.jsonl"), str(tmp_path / "kb.parquet"))
    # kb rows: doc-3 at 0, doc-2 at 1, doc-1 at 2, doc-0 at 3
    assert data.queries["query_id"] == ["7"]
    assert data.queries["positive_rows"] == [[2]] and data.queries["negative_rows"] == [[0, 1]]
    assert data.queries["image"] == [None]
    datasets.Dataset.from_list(kb).save_to_disk(str(tmp_path / "kb_disk"))
    assert load_table(str(tmp_path / "kb_disk"))["id"] == [p["id"] for p in kb]


def test_image_column_is_not_decoded():
    image = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    queries = datasets.Dataset.from_list([{"id": "a", "question": "q", "image": image, "positive_ids": ["x"]}])
    assert isinstance(queries.features["image"], datasets.Image)
    data = prepare_training_data(queries, [{"id": "x", "text": "t"}])
    cell = data.queries[0]["image"]
    assert isinstance(cell, dict) and cell["bytes"]  # loaded lazily, by the collator


@pytest.mark.parametrize(
    "queries, kb, message",
    [
        ([{"id": "a", "question": "q", "positive_ids": ["x", "nope"], "negative_ids": ["gone"]}],
         [{"id": "x", "text": "t"}], "'a'->'nope', 'a'->'gone'"),
        ([{"id": "a", "question": "q", "positive_ids": ["x"]}],
         [{"id": "x", "text": "t"}, {"id": "x", "text": "u"}], "1 duplicate passage ids, e.g. 'x'"),
        ([{"id": "a", "question": "q", "positive_ids": ["x"]}],
         [{"id": "x", "text": "t"}, {"id": "y", "text": "  "}], "empty text and no image (ids 'y')"),
        ([{"id": "a", "question": " ", "positive_ids": ["x"]}], [{"id": "x", "text": "t"}], "empty question"),
        ([{"id": "a", "quest": "q", "positive_ids": ["x"]}], [{"id": "x", "text": "t"}], "question='question'"),
        ([{"id": "a", "question": "q", "positive_ids": ["x"]}, {"id": "a", "question": "r", "positive_ids": ["x"]}],
         [{"id": "x", "text": "t"}], "1 duplicate query ids, e.g. 'a'"),
        ([{"id": "a", "question": "q", "positive_ids": []}], [{"id": "x", "text": "t"}], "no query with a positive"),
    ],
)
def test_bad_data_is_refused_with_a_clear_error(queries, kb, message):
    with pytest.raises(ValueError) as error:
        prepare_training_data(queries, kb)
    assert message in str(error.value)


def test_missing_positive_error_option():
    queries = [{"id": "a", "question": "q", "positive_ids": ["x"]}, {"id": "b", "question": "r", "positive_ids": []}]
    kb = [{"id": "x", "text": "t"}]
    assert prepare_training_data(queries, kb, on_missing_positive="skip").stats.n_skipped_no_positive == 1
    with pytest.raises(ValueError, match="1 of 2 queries have no positive passage \\('b'\\)"):
        prepare_training_data(queries, kb, on_missing_positive="error")


def test_feature_store_file(tmp_path):
    feats, pos = np.ones((3, 4), np.float32), np.full((3, 4), 0.5, np.float32)
    np.savez(tmp_path / "store.npz", **{"ent": feats, "ent.visual_pos": pos, "other": feats * 2})
    store = open_feature_store(tmp_path / "store.npz")
    assert sorted(store) == ["ent", "other"]
    np.testing.assert_array_equal(store["ent"]["visual_pos"], pos)
    assert store["other"]["visual_pos"] is None


def test_data_report_counts(tmp_path, capsys):
    from vl_joint_encoder.commands.data_report import main
    from vl_joint_encoder.data.report import data_report
    from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer

    tokenizer = train_vl_t5_tokenizer(["the cat sat on the mat", "a dog ran in the park"] * 5, vocab_size=40)
    tokenizer.save_pretrained(tmp_path / "tok")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "real.png")
    queries = [
        {"id": "a", "question": "the cat sat", "image": "real.png", "positive_ids": ["p0"], "negative_ids": ["p1", "p2"]},
        {"id": "b", "question": "the dog in Ærøskøbing", "image": "gone.png", "positive_ids": [], "negative_ids": []},
        {"id": "c", "question": "the mat the park the cat the dog", "image": None, "positive_ids": ["p1", "zz"],
         "negative_ids": ["p0"]},
    ]
    kb = [{"id": f"p{i}", "text": t} for i, t in enumerate(["the cat", "a dog ran in the park", " "])]
    report = data_report(queries, kb, tokenizer, query_max_length=6, image_root=str(tmp_path))
    q = report["queries"]
    assert q["count"] == 3 and q["without_positive"] == 1
    assert q["ids_missing_from_kb"] == 1 and q["example_missing_ids"] == ["zz"]
    assert q["positives_per_query"]["mean"] == 1.0 and q["negatives_per_query"]["max"] == 2
    assert q["images"] == {"found": 1, "missing": 1, "none": 1}
    lengths = [len(tokenizer(x["question"])["input_ids"]) for x in queries]
    assert q["text"]["tokens"]["max"] == max(lengths)
    assert q["text"]["truncated_share"] == round(sum(n > 6 for n in lengths) / 3, 4)
    ids = [i for x in queries for i in tokenizer(x["question"])["input_ids"]]
    assert q["text"]["unknown_token_rate"] == round(ids.count(tokenizer.unk_token_id) / len(ids), 6) > 0
    assert [w for w, _ in q["text"]["top_unknown_words"]] == ["Ærøskøbing"]
    assert report["kb"]["empty_texts"] == 1
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in queries))
    (tmp_path / "kb.jsonl").write_text("".join(json.dumps(x) + "\n" for x in kb))
    assert main(["--model", str(tmp_path / "tok"), "--queries", str(tmp_path / "q.jsonl"), "--kb",
                 str(tmp_path / "kb.jsonl"), "--image-root", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "without a positive: 1" in out and "images: found 1, missing 1, none 1" in out
    assert json.loads((tmp_path / "r.json").read_text())["queries"]["count"] == 3
