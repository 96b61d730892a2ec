"""The ViQuAE miniature (tests/viquae_miniature.py) loads back with ``datasets`` as the published data does, and the
join passage -> article -> image resolves."""

import json
import time

import pytest
from datasets import concatenate_datasets, load_dataset, load_from_disk
from PIL import Image
from viquae_miniature import KB_FILES, RECAT_ORDER, SPLITS, write_viquae_miniature

from vl_joint_encoder.viquae.relevance import AnswerMatcher, provenance_relevance


QUESTION_COLUMNS = ["image", "input", "kilt_id", "id", "meta", "original_question", "output", "url", "wikidata_id"]
ARTICLE_COLUMNS = [
    "anchors",
    "categories",
    "image",
    "kilt_id",
    "text",
    "url",
    "wikidata_info",
    "wikipedia_id",
    "wikipedia_title",
]


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    root = tmp_path_factory.mktemp("viquae")
    start = time.perf_counter()
    paths = write_viquae_miniature(root / "data")
    return paths, time.perf_counter() - start, root / "cache"


def _recat(paths, cache):
    # README.rst: load_dataset('PaulLerner/viquae_wikipedia', data_files=...) then concatenate_datasets in this order
    kb = load_dataset("json", data_files={name: str(paths[name]) for name in KB_FILES}, cache_dir=str(cache / "kb"))
    return kb, concatenate_datasets([kb[name] for name in RECAT_ORDER])


def test_written_quickly_and_deterministically(miniature, tmp_path):
    paths, seconds, _ = miniature
    assert seconds < 5
    again = write_viquae_miniature(tmp_path / "again")
    for key in ("train_jsonl", "validation_jsonl", "test_jsonl", *KB_FILES):
        assert again[key].read_bytes() == paths[key].read_bytes()


def test_questions_load_from_both_formats(miniature):
    paths, _, cache = miniature
    dataset = load_from_disk(str(paths["dataset"]))
    assert list(dataset) == list(SPLITS)
    from_json = load_dataset(
        "json", data_files={split: str(paths[f"{split}_jsonl"]) for split in SPLITS}, cache_dir=str(cache / "q")
    )
    for split in SPLITS:
        assert dataset[split].column_names == QUESTION_COLUMNS
        assert from_json[split].column_names == QUESTION_COLUMNS
        assert len(dataset[split]) > 0
        # same python objects either way (the JSON loader infers int64/float64 where save_to_disk keeps int32)
        assert json.loads(json.dumps(dataset[split].to_list())) == json.loads(json.dumps(from_json[split].to_list()))
        for item in dataset[split]:
            output = item["output"]
            assert isinstance(output["original_answer"], str)
            assert isinstance(output["answer"], list) and all(isinstance(a, str) for a in output["answer"])
            assert all(isinstance(p["title"], list) for p in output["provenance"])
            assert len(item["id"]) == 32 and int(item["id"], 16) >= 0
            assert item["image"].startswith("512px-") and item["url"].endswith("/" + item["image"])
            assert (paths["images"] / item["image"]).is_file()


def test_passage_article_image_join(miniature):
    paths, _, cache = miniature
    kb, recat = _recat(paths, cache)
    for name in KB_FILES:
        assert kb[name].column_names == ARTICLE_COLUMNS and len(kb[name]) > 0
    passages = load_from_disk(str(paths["passages"]))
    assert passages.column_names == ["passage", "index"]
    # index: the article's row in the concatenation, not sorted by passage id
    indices = passages["index"]
    assert sorted(set(indices)) == list(range(len(recat)))
    assert list(indices) != sorted(indices)
    titles, images = recat["wikipedia_title"], recat["image"]
    for passage, index in zip(passages["passage"], indices):
        title, _, text = passage.partition(" [SEP] ")
        assert title == titles[index] and text
        with Image.open(paths["images"] / images[index]) as image:
            assert image.width > 0 and image.height > 0
    # the question image is another file than the article's
    dataset = load_from_disk(str(paths["dataset"]))
    title2index = {title: i for i, title in enumerate(titles)}
    for item in dataset["train"]:
        article = title2index[item["output"]["provenance"][0]["title"][0]]
        assert item["image"] != images[article]


def test_relevance_on_the_miniature(miniature):
    paths, _, cache = miniature
    _, recat = _recat(paths, cache)
    passages = load_from_disk(str(paths["passages"]))["passage"]
    indices = load_from_disk(str(paths["passages"]))["index"]
    title2index = {title: i for i, title in enumerate(recat["wikipedia_title"])}
    article2passage = {}
    for passage_id, article in enumerate(indices):
        article2passage.setdefault(article, []).append(passage_id)
    dataset = load_from_disk(str(paths["dataset"]))
    counts = {"empty": 0, "alias_only": 0, "numeric": 0, "questions": 0, "multi_article": 0}
    for split in SPLITS:
        for item in dataset[split]:
            counts["questions"] += 1
            titles = {p["title"][0] for p in item["output"]["provenance"]}
            assert titles <= title2index.keys()
            counts["multi_article"] += len(titles) > 1
            relevant, original = provenance_relevance(item, title2index, article2passage, passages)
            assert set(original) <= set(relevant)
            assert all(indices[i] in {title2index[t] for t in titles} for i in relevant)
            counts["empty"] += not relevant
            counts["alias_only"] += bool(relevant) and not original
            counts["numeric"] += item["output"]["original_answer"].replace(",", "").replace(".", "").isdigit()
            if relevant:
                matcher = AnswerMatcher.from_item(item)
                assert matcher.contains(passages[relevant[0]])
    assert counts["empty"] == 1
    assert counts["alias_only"] >= 1 and counts["multi_article"] == 1
    assert counts["numeric"] >= 3 and counts["questions"] >= 12
