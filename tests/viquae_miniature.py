"""A miniature ViQuAE, written in the layout its authors publish (see docs/viquae.md), for tests.

``write_viquae_miniature(root)`` writes, under ``root``:

- ``viquae_dataset/``: the questions, a ``datasets.DatasetDict`` saved with ``save_to_disk`` (splits train,
  validation, test), with the published columns ``image, input, kilt_id, id, meta, original_question, output,
  url, wikidata_id`` (KILT-style nesting: ``output['answer']`` list, ``output['original_answer']`` str,
  ``output['provenance']`` list of dicts whose ``title`` is a list);
- ``viquae_dataset_jsonl/{train,validation,test}.jsonl``: the same rows as the hub repo
  ``PaulLerner/viquae_dataset`` stores them (one JSON object per line);
- ``viquae_wikipedia/{humans_with_faces,humans_without_faces,non_humans}.jsonl.gz``: the articles, as the hub repo
  ``PaulLerner/viquae_wikipedia`` stores them, with the columns ``anchors, categories, image, kilt_id, text, url,
  wikidata_info, wikipedia_id, wikipedia_title`` (``text['paragraph']`` a list of paragraphs, KILT style: the
  first is the title, "Section::::" and "BULLET::::" paragraphs included);
- ``viquae_passages/``: ``save_to_disk`` folder with ``passage`` ("<title> [SEP] <text>") and ``index``, the row of
  the passage's article in ``concatenate_datasets([non_humans, humans_with_faces, humans_without_faces])``. A
  passage's id is its row. As on the hub (``viquae_v4-alpha_passages``), articles are not visited in that
  concatenation's order, so ``index`` is not sorted (each article's passages are contiguous);
- ``images/``: the image files (``$VIQUAE_IMAGES_PATH``), real photographs from ``skimage.data``, small, named as
  Wikimedia Commons thumbnails (``512px-<File name>``); each question has its own image, distinct from the image
  of its entity's article.

Everything is fictional and deterministic given ``seed``. The answers are written into the articles so that
relevance (``vl_joint_encoder.viquae.relevance``) is non-empty for every question but one, whose answer is in no
passage; some questions have numerical answers (years, counts written with separators, decimals), a few are
relevant only through an alias, one has two provenance articles.
"""

import gzip
import hashlib
import io
import json
import random
import re
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Features, List, Value
from PIL import Image


SPLITS = ("train", "validation", "test")
# the three hub files, and the order in which the authors concatenate them into viquae_wikipedia_recat
KB_FILES = ("humans_with_faces", "humans_without_faces", "non_humans")
RECAT_ORDER = ("non_humans", "humans_with_faces", "humans_without_faces")
IMAGE_WIDTH = 48
WORDS_PER_PASSAGE = 30

_STRINGS = List(Value("string"))
_INT32S = List(Value("int32"))

ARTICLE_FEATURES = Features(
    {
        "anchors": {
            "end": _INT32S,
            "href": _STRINGS,
            "paragraph_id": _INT32S,
            "start": _INT32S,
            "text": _STRINGS,
            "wikipedia_id": _STRINGS,
            "wikipedia_title": _STRINGS,
        },
        "categories": Value("string"),
        "image": Value("string"),
        "kilt_id": Value("string"),
        "text": {"paragraph": _STRINGS},
        "url": Value("string"),
        "wikidata_info": {
            "aliases": {"alias": _STRINGS},
            "description": Value("string"),
            "enwikiquote_title": Value("string"),
            "wikidata_id": Value("string"),
            "wikidata_label": Value("string"),
            "wikipedia_title": Value("string"),
        },
        "wikipedia_id": Value("string"),
        "wikipedia_title": Value("string"),
    }
)

QUESTION_FEATURES = Features(
    {
        "image": Value("string"),
        "input": Value("string"),
        "kilt_id": Value("string"),
        "id": Value("string"),
        # KILT's kilt_tasks "meta", empty for TriviaQA questions
        "meta": {
            "left_context": Value("string"),
            "mention": Value("string"),
            "right_context": Value("string"),
            "partial_evidence": {
                "start_paragraph_id": _INT32S,
                "end_paragraph_id": _INT32S,
                "title": _STRINGS,
                "section": _STRINGS,
                "wikipedia_id": _STRINGS,
                "meta": List({"evidence_span": _STRINGS}),
            },
            "obj_surface": {"text": _STRINGS},
            "sub_surface": {"text": _STRINGS},
            "subj_aliases": {"text": _STRINGS},
            "template_questions": {"text": _STRINGS},
        },
        "original_question": Value("string"),
        "output": {
            "answer": _STRINGS,
            "meta": List({"score": Value("int32")}),
            "provenance": List(
                {
                    "bleu_score": List(Value("float32")),
                    "start_character": _INT32S,
                    "start_paragraph_id": _INT32S,
                    "end_character": _INT32S,
                    "end_paragraph_id": _INT32S,
                    "meta": List(
                        {
                            "fever_page_id": Value("string"),
                            "fever_sentence_id": Value("int32"),
                            "annotation_id": Value("string"),
                            "yes_no_answer": Value("string"),
                            "evidence_span": {"text": _STRINGS},
                        }
                    ),
                    "section": _STRINGS,
                    "title": _STRINGS,
                    "wikipedia_id": _STRINGS,
                }
            ),
            "original_answer": Value("string"),
        },
        "url": Value("string"),
        "wikidata_id": Value("string"),
    }
)

PASSAGE_FEATURES = Features({"passage": Value("string"), "index": Value("int64")})

_FIRST = ["Ilse", "Marek", "Odile", "Tomas", "Yara", "Bruno", "Selma", "Viktor", "Zoë", "Oskar", "Petra", "Anouk"]
_LAST = ["Marovic", "Lindqvist", "Haddad", "Ferreira", "Kowalczyk", "Nakamura", "Ødegaard", "Brennan", "Varga"]
_OCCUPATIONS = [
    ("mathematician", "theorems", "proved"),
    ("novelist", "letters", "wrote"),
    ("painter", "canvases", "painted"),
    ("footballer", "goals", "scored"),
    ("astronomer", "comets", "catalogued"),
    ("architect", "buildings", "designed"),
]
_NATIONALITIES = ["Kestrian", "Valdorian", "Morvish", "Esterlandic"]
_TOWNS = ["Velmora", "Kerrowick", "Tresmont", "Ilvane", "Corrandel", "Bålsta", "Saint-Aubin-sur-Lac", "Druvik"]
_KINDS = [("Lighthouse", "lighthouse"), ("Abbey", "abbey"), ("Stadium", "stadium"), ("Bridge", "bridge")]
_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "clock", "immunohistochemistry")
_TRIVIAQA_PREFIXES = ("tc", "qb", "sfq", "odql", "qw", "bt", "wh", "dpql")
_PHOTO_CACHE: dict[str, np.ndarray] = {}


def _photo(name: str) -> np.ndarray:
    if name not in _PHOTO_CACHE:
        import skimage.data

        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        _PHOTO_CACHE[name] = image[..., :3].astype(np.uint8)
    return _PHOTO_CACHE[name]


def _save_photo(path: Path, name: str, rng: random.Random) -> None:
    """A random crop of a skimage photograph, IMAGE_WIDTH pixels wide, saved under its Commons file name."""
    image = _photo(name)
    height, width = image.shape[:2]
    crop_h, crop_w = int(height * rng.uniform(0.6, 0.9)), int(width * rng.uniform(0.6, 0.9))
    top, left = rng.randrange(height - crop_h + 1), rng.randrange(width - crop_w + 1)
    crop = Image.fromarray(image[top : top + crop_h, left : left + crop_w])
    crop = crop.resize((IMAGE_WIDTH, max(1, round(crop_h * IMAGE_WIDTH / crop_w))), Image.BILINEAR)
    crop.save(path, format="PNG" if path.suffix == ".png" else "JPEG", quality=85)


def _commons_thumbnail(file_name: str) -> str:
    """The 512px thumbnail URL Wikimedia Commons gives a file (its md5 picks the two directory levels)."""
    digest = hashlib.md5(file_name.encode("utf-8")).hexdigest()
    return (
        f"http://upload.wikimedia.org/wikipedia/commons/thumb/{digest[0]}/{digest[:2]}/{file_name}/512px-{file_name}"
    )


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def _make_entities(n_articles: int, rng: random.Random) -> list[dict]:
    """Fictional entities: about half humans (with a face photo or without), the others places."""
    n_with_faces = max(1, n_articles // 3)
    n_without_faces = max(1, n_articles // 6)
    n_places = n_articles - n_with_faces - n_without_faces
    if n_places < 1:
        raise ValueError("n_articles must be at least 3 (one article per KB file)")
    people = [f"{first} {last}" for first in _FIRST for last in _LAST]
    rng.shuffle(people)
    places = [f"{town} {kind}" for town in _TOWNS for kind, _ in _KINDS]
    rng.shuffle(places)
    entities = []
    for position in range(n_articles):
        file = "humans_with_faces" if position < n_with_faces else "humans_without_faces"
        if position >= n_with_faces + n_without_faces:
            file = "non_humans"
        entity = {
            "file": file,
            "qid": f"Q{rng.randrange(10**5, 10**8)}",
            "wikipedia_id": str(rng.randrange(10**4, 10**8)),
            "year": rng.randrange(1890, 1995),
            "town": rng.choice(_TOWNS),
            "nationality": rng.choice(_NATIONALITIES),
            "count": rng.randrange(1001, 98000),
        }
        if file == "non_humans":
            entity["title"] = places.pop() if places else f"Place {position}"
            kind = entity["title"].split()[-1]
            entity["kind"] = dict(_KINDS).get(kind, "building")
            entity["town"] = entity["title"].split()[0]
            entity["height"] = f"{rng.randrange(12, 300)}.{rng.randrange(1, 10)}"
        else:
            entity["title"] = people.pop() if people else f"Person {position}"
            entity["occupation"], entity["unit"], entity["verb"] = rng.choice(_OCCUPATIONS)
        entities.append(entity)
    return entities


def _a(word: str) -> str:
    return f"{'an' if word[0].lower() in 'aeiou' else 'a'} {word}"


def _paragraphs(entity: dict) -> list[str]:
    """The KILT-style paragraphs of the entity's article (first one: the title)."""
    title, year, town, count = entity["title"], entity["year"], entity["town"], f"{entity['count']:,}"
    if entity["file"] == "non_humans":
        kind = entity["kind"]
        return [
            f"{title}\n",
            f"The {title} is {_a(kind)} in {town}, {_a(entity['nationality'])} town. "
            f"It was completed in {year} after nine years of work.\n",
            "Section::::History.\n",
            f"The first stone was laid by the mayor of {town}. "
            f"A storm damaged the {kind} in {year + 31}, and it was restored by local masons. "
            f"Since then it has welcomed about {count} visitors a year.\n",
            "BULLET::::- List of monuments of the region\n",
            "Section::::Description.\n",
            f"The {kind} is {entity['height']} metres tall. Its walls are made of grey granite from the hills. "
            "Guided tours are offered in summer, and a small shop sells postcards and maps.\n",
        ]
    name = title.split()[0]
    return [
        f"{title}\n",
        f"{title} (born {year} in {town}) is {_a(entity['nationality'])} {entity['occupation']}. "
        f"{name} is best known for a long career and many prizes.\n",
        "Section::::Early life.\n",
        f"{name} grew up in {town} with three siblings, and left for the capital at the age of eighteen. "
        "There, evening classes and a patient teacher changed everything.\n",
        "Section::::Career.\n",
        f"Over the years, {name} {entity['verb']} {count} {entity['unit']}, a record at the time. "
        f"Critics praised the work in {year + 40}, long after the first attempts.\n",
        "BULLET::::- Honorary member of the national academy\n",
    ]


def _passages(paragraphs: list[str], title: str) -> list[str]:
    """A simplified ``meerqat.data.loading.make_passage_item`` (method "uniform_sents", "special_fields"): drop
    the title paragraph and the Section/BULLET ones, cut into sentences, group them up to WORDS_PER_PASSAGE words,
    prefix each passage with "<title> [SEP] "."""
    kept = [p for p in paragraphs[1:] if not p.startswith(("Section::::", "BULLET::::"))]
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", "".join(kept)) if s.strip()]
    passages, current, n_words = [], [], 0
    for sentence in sentences:
        length = len(sentence.split())
        if current and n_words + length > WORDS_PER_PASSAGE:
            passages.append(" ".join(current))
            current, n_words = [], 0
        current.append(sentence)
        n_words += length
    if current:
        passages.append(" ".join(current))
    return [f"{title} [SEP] {passage}" for passage in passages]


def _article_row(entity: dict, images: Path, rng: random.Random) -> dict:
    title = entity["title"]
    file_name = title.replace(" ", "_") + ".jpg"
    image = f"512px-{file_name}"
    photo = "astronaut" if entity["file"] == "humans_with_faces" else rng.choice(_PHOTOS[1:])
    _save_photo(images / image, photo, rng)
    paragraphs = _paragraphs(entity)
    start = paragraphs[1].find(entity["town"])
    if entity["file"] == "non_humans":
        categories = f"Buildings and structures in {entity['town']},{entity['year']} establishments"
        description = f"{entity['kind']} in {entity['town']}"
        aliases = [title.replace(" ", "-"), f"{entity['town']} {entity['kind']}"]
    else:
        categories = f"Living people,{entity['year']} births,{entity['nationality']} {entity['occupation']}s"
        description = f"{entity['nationality']} {entity['occupation']}"
        aliases = [f"{title.split()[0][0]}. {title.split()[-1]}"]
    return {
        "anchors": {
            "end": [start + len(entity["town"])],
            "href": [entity["town"].replace(" ", "%20")],
            "paragraph_id": [1],
            "start": [start],
            "text": [entity["town"]],
            "wikipedia_id": [str(rng.randrange(10**4, 10**8))],
            "wikipedia_title": [entity["town"]],
        },
        "categories": categories,
        "image": image,
        "kilt_id": entity["wikipedia_id"],
        "text": {"paragraph": paragraphs},
        "url": _commons_thumbnail(file_name),
        "wikidata_info": {
            "aliases": {"alias": aliases},
            "description": description,
            "enwikiquote_title": "",
            "wikidata_id": entity["qid"],
            "wikidata_label": title,
            "wikipedia_title": title,
        },
        "wikipedia_id": entity["wikipedia_id"],
        "wikipedia_title": title,
    }


def _question_specs(entity: dict, kind: str) -> tuple[str, str, str, list[str]]:
    """(visual question, original TriviaQA-style question, original answer, answers) for one question kind."""
    title, human = entity["title"], entity["file"] != "non_humans"
    mention = f"this {entity['occupation']}" if human else f"this {entity['kind']}"
    name = title if human else f"the {title}"
    if kind == "place":
        if human:
            return f"where was {mention} born?", f"Where was {name} born?", entity["town"], [entity["town"]]
        return f"in which town is {mention}?", f"In which town is {name}?", entity["town"], [entity["town"]]
    if kind == "alias_only":
        # the original answer is written nowhere; its alias (the town) is
        original = f"Municipality of {entity['town']}"
        question = f"which municipality is {mention} from?" if human else f"which municipality owns {mention}?"
        return question, f"Which municipality is {name} linked to?", original, [original, entity["town"]]
    if kind == "year":
        year = str(entity["year"])
        if human:
            return f"in which year was {mention} born?", f"In which year was {name} born?", year, [year]
        return f"when was {mention} completed?", f"When was {name} completed?", year, [year]
    if kind == "count":
        count = f"{entity['count']:,}"
        if human:
            question = f"how many {entity['unit']} has {mention} {entity['verb']}?"
            return (
                question,
                f"How many {entity['unit']} has {name} {entity['verb']}?",
                count,
                [count, str(entity["count"])],
            )
        question = f"how many visitors does {mention} welcome each year?"
        return question, f"How many visitors does {name} welcome each year?", count, [count, str(entity["count"])]
    if kind == "height":
        height = entity["height"]
        question = f"how tall is {mention}, in metres?"
        return question, f"How tall is {name}, in metres?", height, [height, f"{height} metres", f"{height} m"]
    if kind == "absent":
        return (
            f"what is the favourite dish of {mention}?",
            f"What is the favourite dish of {name}?",
            "Zanzibar pudding",
            ["Zanzibar pudding", "Zanzibari pudding"],
        )
    raise ValueError(kind)


def _provenance(entity: dict) -> dict:
    return {
        "bleu_score": [1.0],
        "start_character": [0],
        "start_paragraph_id": [1],
        "end_character": [len(entity["title"])],
        "end_paragraph_id": [1],
        "meta": [],
        "section": ["Section::::Abstract"],
        "title": [entity["title"]],
        "wikipedia_id": [entity["wikipedia_id"]],
    }


def _empty_meta() -> dict:
    return {
        "left_context": "",
        "mention": "",
        "right_context": "",
        "partial_evidence": {
            "start_paragraph_id": [],
            "end_paragraph_id": [],
            "title": [],
            "section": [],
            "wikipedia_id": [],
            "meta": [],
        },
        "obj_surface": {"text": []},
        "sub_surface": {"text": []},
        "subj_aliases": {"text": []},
        "template_questions": {"text": []},
    }


def _question_plan(entities: list[dict]) -> list[tuple[dict, str]]:
    """Which questions to ask: one or two per entity, every kind at least once, one question without answer."""
    human_kinds = ("place", "year", "count", "alias_only")
    place_kinds = ("place", "year", "height", "count", "alias_only")
    plan = []
    for position, entity in enumerate(entities):
        kinds = place_kinds if entity["file"] == "non_humans" else human_kinds
        plan.append((entity, kinds[position % len(kinds)]))
        if position % 2 == 0 and plan[-1][1] != "place":
            plan.append((entity, "place"))
    for kind in ("place", "year", "count", "alias_only", "height"):
        if all(planned != kind for _, planned in plan):
            candidates = [e for e in entities if kind != "height" or e["file"] == "non_humans"]
            plan.append((candidates[len(plan) % len(candidates)], kind))
    plan.append((entities[len(entities) // 2], "absent"))
    return plan


def _questions(entities: list[dict], images: Path, rng: random.Random) -> dict[str, list[dict]]:
    plan = _question_plan(entities)
    splits = {split: [] for split in SPLITS}
    for number, (entity, kind) in enumerate(plan):
        visual_question, original_question, original_answer, answers = _question_specs(entity, kind)
        file_name = f"{entity['title'].replace(' ', '_')}_{number}.{'png' if number % 5 == 4 else 'jpg'}"
        image = f"512px-{file_name}"
        photo = "astronaut" if entity["file"] == "humans_with_faces" else _PHOTOS[number % len(_PHOTOS)]
        _save_photo(images / image, photo, rng)
        url = _commons_thumbnail(file_name)
        kilt_id = f"{_TRIVIAQA_PREFIXES[number % len(_TRIVIAQA_PREFIXES)]}_{rng.randrange(1, 20000)}"
        provenance = [_provenance(entity)]
        if number == 0:
            # KILT repeats provenance; this question also cites a second (real) article
            provenance += [_provenance(entity), _provenance(entities[(entities.index(entity) + 1) % len(entities)])]
        splits[SPLITS[number % len(SPLITS)]].append(
            {
                "image": image,
                "input": visual_question,
                "kilt_id": kilt_id,
                "id": _md5("".join((kilt_id, entity["qid"], visual_question, url))),
                "meta": _empty_meta(),
                "original_question": original_question,
                "output": {
                    "answer": answers,
                    "meta": [],
                    "provenance": provenance,
                    "original_answer": original_answer,
                },
                "url": url,
                "wikidata_id": entity["qid"],
            }
        )
    return splits


def _write_jsonl(rows: list[dict], path: Path, compress: bool = False) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    if compress:
        buffer = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as file:
            file.write(text)
        text = buffer.getvalue()
    path.write_bytes(text)


def write_viquae_miniature(root, n_articles: int = 12, seed: int = 0) -> dict[str, Path]:
    """Write the miniature under ``root`` (created if needed); return the paths of what it wrote.

    Keys: ``root``, ``dataset`` (save_to_disk DatasetDict), ``dataset_jsonl`` (folder) and ``train_jsonl``,
    ``validation_jsonl``, ``test_jsonl``; ``wikipedia`` (folder) and ``humans_with_faces``,
    ``humans_without_faces``, ``non_humans`` (the .jsonl.gz files); ``passages`` (save_to_disk Dataset);
    ``images`` (the images folder).
    """
    root = Path(root)
    rng = random.Random(seed)
    paths = {
        "root": root,
        "dataset": root / "viquae_dataset",
        "dataset_jsonl": root / "viquae_dataset_jsonl",
        "wikipedia": root / "viquae_wikipedia",
        "passages": root / "viquae_passages",
        "images": root / "images",
    }
    for key in ("dataset_jsonl", "wikipedia", "images"):
        paths[key].mkdir(parents=True, exist_ok=True)

    entities = _make_entities(n_articles, rng)
    articles = {name: [] for name in KB_FILES}
    for entity in entities:
        articles[entity["file"]].append(_article_row(entity, paths["images"], rng))
    for name in KB_FILES:
        paths[name] = paths["wikipedia"] / f"{name}.jsonl.gz"
        _write_jsonl(articles[name], paths[name], compress=True)

    # passages: article rows in the authors' concatenation order, articles visited in another order
    recat = [row for name in RECAT_ORDER for row in articles[name]]
    order = list(range(len(recat)))
    rng.shuffle(order)
    passage_rows = {"passage": [], "index": []}
    for article_index in order:
        row = recat[article_index]
        for passage in _passages(row["text"]["paragraph"], row["wikipedia_title"]):
            passage_rows["passage"].append(passage)
            passage_rows["index"].append(article_index)
    Dataset.from_dict(passage_rows, features=PASSAGE_FEATURES).save_to_disk(str(paths["passages"]))

    # questions: entities in the recat order so that questions do not follow the KB files' order either
    in_recat_order = [entity for name in RECAT_ORDER for entity in entities if entity["file"] == name]
    questions = _questions(in_recat_order, paths["images"], rng)
    DatasetDict(
        {split: Dataset.from_list(rows, features=QUESTION_FEATURES) for split, rows in questions.items()}
    ).save_to_disk(str(paths["dataset"]))
    for split, rows in questions.items():
        paths[f"{split}_jsonl"] = paths["dataset_jsonl"] / f"{split}.jsonl"
        _write_jsonl(rows, paths[f"{split}_jsonl"])
    return paths
