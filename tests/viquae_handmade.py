"""A hand-written ViQuAE world in the published layout (the features of tests/viquae_miniature.py): 3 articles, 6
passages, 5 questions, small enough that the expected relevance, BM25 scores and negatives are written by hand in
the tests."""

import gzip
import json
from pathlib import Path

from datasets import Dataset, DatasetDict
from PIL import Image
from viquae_miniature import PASSAGE_FEATURES, QUESTION_FEATURES, _empty_meta, _provenance


# recat order: non_humans, humans_with_faces, humans_without_faces -> rows 0, 1, 2
ARTICLES = {
    "non_humans": [("Velmora Lighthouse", "512px-Velmora_Lighthouse.jpg")],
    "humans_with_faces": [("Ilse Marovic", "512px-Ilse_Marovic.jpg")],
    "humans_without_faces": [("Marek Haddad", "512px-Marek_Haddad.png")],
}
PASSAGES = [
    ("Ilse Marovic [SEP] Ilse Marovic (born 1931 in Kerrowick) is a Kestrian painter.", 1),
    ("Ilse Marovic [SEP] She painted 1,200 canvases, most of them of the sea.", 1),
    ("Velmora Lighthouse [SEP] The Velmora Lighthouse was completed in 1931.", 0),
    ("Velmora Lighthouse [SEP] It stands in the town of Kerrowick.", 0),
    ("Marek Haddad [SEP] Marek Haddad is a novelist from Tresmont.", 2),
    ("Marek Haddad [SEP] He wrote about Kerrowick's harbour.", 2),
]
# id, split, question, original answer, answers, provenance titles
QUESTIONS = [
    ("q1", "train", "where was this painter born?", "Kerrowick", ["Kerrowick", "Kerrowick town"], ["Ilse Marovic"]),
    ("q2", "train", "when was this lighthouse completed?", "1931", ["1931"], ["Velmora Lighthouse"]),
    ("q3", "train", "how many canvases did this painter paint?", "one thousand two hundred",
     ["one thousand two hundred", "1,200", "1200"], ["Ilse Marovic"]),
    ("q4", "validation", "what is this dancer's favourite dish?", "Zanzibar pudding", ["Zanzibar pudding"],
     ["Nobody Known"]),
    ("q5", "test", "which town is this harbour in?", "Kerrowick", ["Kerrowick"], ["Marek Haddad", "Velmora Lighthouse"]),
]
# written by hand from the rule (docs/viquae.md): passages of the provenance articles with an answer as whole words
EXPECTED_PROVENANCE = {"q1": [0], "q2": [2], "q3": [1], "q4": [], "q5": [3]}  # q5: "Kerrowick's" -> "kerrowicks"
EXPECTED_ORIGINAL = {"q1": [0], "q2": [2], "q3": [], "q4": [], "q5": [3]}


def _article(title: str, image: str) -> dict:
    return {
        "anchors": {"end": [], "href": [], "paragraph_id": [], "start": [], "text": [], "wikipedia_id": [],
                    "wikipedia_title": []},
        "categories": "", "image": image, "kilt_id": title, "text": {"paragraph": [title + "\n"]}, "url": "",
        "wikidata_info": {"aliases": {"alias": []}, "description": "", "enwikiquote_title": "", "wikidata_id": "Q1",
                          "wikidata_label": title, "wikipedia_title": title},
        "wikipedia_id": title, "wikipedia_title": title,
    }  # fmt: skip


def write_handmade(root) -> dict:
    root = Path(root)
    (root / "wikipedia").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    for name, articles in ARTICLES.items():
        lines = "".join(json.dumps(_article(*a)) + "\n" for a in articles).encode()
        (root / "wikipedia" / f"{name}.jsonl.gz").write_bytes(gzip.compress(lines, mtime=0))
        for _, image in articles:
            Image.new("RGB", (8, 8), (len(image) * 7 % 255, 90, 30)).save(root / "images" / image)
    Dataset.from_dict({"passage": [p for p, _ in PASSAGES], "index": [i for _, i in PASSAGES]},
                      features=PASSAGE_FEATURES).save_to_disk(str(root / "passages"))  # fmt: skip
    splits = {"train": [], "validation": [], "test": []}
    for qid, split, question, original, answers, titles in QUESTIONS:
        image = f"512px-{qid}.jpg"
        Image.new("RGB", (8, 8), (10, len(qid) * 40, 200)).save(root / "images" / image)
        provenance = [{**_provenance({"title": t, "wikipedia_id": "1"})} for t in titles]
        splits[split].append({
            "image": image, "input": question, "kilt_id": qid, "id": qid, "meta": _empty_meta(),
            "original_question": question, "url": "", "wikidata_id": "Q1",
            "output": {"answer": answers, "meta": [], "provenance": provenance, "original_answer": original},
        })  # fmt: skip
    DatasetDict({s: Dataset.from_list(rows, features=QUESTION_FEATURES) for s, rows in splits.items()}).save_to_disk(
        str(root / "questions")
    )
    return {"root": root, "articles": root / "wikipedia", "passages": root / "passages",
            "questions": root / "questions", "images": root / "images"}  # fmt: skip
