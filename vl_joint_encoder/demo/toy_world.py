"""A small, deterministic multimodal knowledge base ("toy world") in which retrieval needs BOTH the image and the question.

Why this design (ViQuAE in miniature, learnable in minutes on a CPU):

- Each **entity** is a made-up place ("Velmora", "Quintarro", ...) with a look of its own, its *sigil*: 2-3 coloured
  shapes (see `render.py`). No two entities share the same set of colours, so the look identifies the entity.
- Each entity has one **passage per attribute** ("Velmora was founded in 1823.", "The emblem of Velmora shows a
  heron.", ...). Every KB passage is *multimodal*: its text plus the entity's canonical image, as a Wikipedia
  article comes with its infobox picture (ViQuAE's KB pairs each passage with its article's image).
- A **question never names the entity** ("When was this founded?") and comes with a fresh *rendering* of the entity:
  rotated, scaled, shifted, on another background, with noise. The rendering says *which* entity (by looking like
  the passage's canonical image), the question says *which* passage of it (by its attribute words).
- Hence the ablations: without images (text only) every entity's passage about the asked attribute is equally good,
  so MRR@10 falls to chance, about H_10 / N for N entities; without the question it falls to the chance of guessing
  the attribute. Nothing in the text tells entities apart for a query, and nothing in the image tells attributes apart.
- Because the match is "the rendering looks like the passage's image", it transfers to **entities never seen in
  training**: the `unseen` split asks about entities whose passages are in the KB but whose queries and passages were
  never trained on.

Splits: `train`, `validation` and `test` hold different renderings (and question paraphrases drawn at random) of the
training entities; `unseen` holds renderings of the held-out entities. The KB holds every entity's passages, so every
split is searched against the same KB. Everything is generated from `seed` at run time: the same seed gives the
same world, pixel for pixel.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .render import PALETTE, SHAPE_KINDS, Shape, render_sigil


# attribute -> (passage template, question paraphrases, value generator name)
ATTRIBUTES = {
    "founded": (
        "{name} was founded in {value}.",
        ("When was this founded?", "In which year was this place founded?", "What is the founding year of this?"),
    ),
    "founder": (
        "{name} was founded by {value}.",
        ("Who founded this?", "Who was the founder of this place?", "Whom was this founded by?"),
    ),
    "region": (
        "{name} lies in the region of {value}.",
        ("In which region is this?", "Where does this lie?", "What region is this place in?"),
    ),
    "motto": (
        'The motto of {name} is "{value}".',
        ("What is the motto of this place?", "Which motto does this have?", "What motto is written here?"),
    ),
    "population": (
        "{name} has {value} inhabitants.",
        ("How many inhabitants does this have?", "How many people live here?", "What is the population of this?"),
    ),
    "emblem": (
        "The emblem of {name} shows a {value}.",
        ("Which animal is on the emblem of this?", "What does the emblem of this show?", "What animal is its emblem?"),
    ),
    "river": (
        "{name} stands on the river {value}.",
        ("Which river flows here?", "On which river does this stand?", "What river is this on?"),
    ),
    "language": (
        "The people of {name} speak {value}.",
        ("What language is spoken here?", "Which language do people speak here?", "What do the people here speak?"),
    ),
}

_SYLLABLES = ("vel", "mor", "qu", "in", "tar", "ro", "bel", "da", "lis", "zan", "ko", "rith", "an", "sel", "ve", "thar",
              "mi", "ra", "dun", "el", "gor", "na", "pel", "sto", "ul", "wen", "ca", "dre", "fa", "lor")
_FIRST = ("Anna", "Boris", "Clara", "Dmitri", "Elsa", "Felix", "Greta", "Hugo", "Ida", "Jonas", "Karla", "Leon",
          "Mira", "Nils", "Olga", "Pavel", "Rosa", "Sven", "Tilda", "Viktor")
_LAST = ("Amberg", "Brenner", "Castell", "Dorn", "Eckhart", "Falk", "Grimm", "Holt", "Iver", "Jansen", "Kessler",
         "Lind", "Marek", "Nordin", "Ostrov", "Pellan", "Quist", "Roth", "Stahl", "Tamm")
_REGIONS = ("the north coast", "the high plateau", "the eastern marshes", "the southern vales", "the western hills",
            "the lake country", "the salt flats", "the pine forests", "the river delta", "the red canyons")
_MOTTO_WORDS = ("light", "stone", "river", "honour", "patience", "courage", "harvest", "wind", "unity", "silence",
                "fire", "memory", "salt", "iron", "song", "dawn")
_ANIMALS = ("heron", "wolf", "stag", "falcon", "bear", "otter", "lynx", "swan", "boar", "owl", "salmon", "hare")
_LANGUAGES = ("Velish", "Ortan", "Miradic", "Kessan", "Dunric", "Aloran", "Pethic", "Sorvan")


@dataclass(frozen=True)
class Entity:
    """A toy-world entity: a name, a look (sigil) and one value per attribute."""

    entity_id: str
    name: str
    sigil: tuple[Shape, ...]
    facts: dict[str, str] = field(hash=False)


@dataclass
class ToyWorld:
    """
    The generated data, in the package's data format (see `vl_joint_encoder/data.py`):

    - `kb`: rows `id`, `text`, `image` (PIL, the entity's canonical image), `entity`, `attribute`.
    - `splits[name]`: query rows `id`, `question`, `image` (PIL, a fresh rendering), `positive_ids` (one KB id),
      `entity`, `attribute`; names `train`, `validation`, `test`, `unseen`.
    - `entities` / `unseen_entities`: the training and held-out entities.
    """

    seed: int
    image_size: int
    entities: list[Entity]
    unseen_entities: list[Entity]
    kb: list[dict]
    splits: dict[str, list[dict]]

    def qrels(self, split: str) -> dict[str, dict[str, int]]:
        """ranx-style qrels of a split: query id -> {positive KB id: 1}."""
        return {row["id"]: {pid: 1 for pid in row["positive_ids"]} for row in self.splits[split]}

    @property
    def attributes(self) -> list[str]:
        return list(ATTRIBUTES)[: len(next(iter(self.kb_by_entity().values())))]

    def kb_by_entity(self) -> dict[str, list[dict]]:
        grouped: dict[str, list[dict]] = {}
        for row in self.kb:
            grouped.setdefault(row["entity"], []).append(row)
        return grouped


def _names(rng: np.random.Generator, count: int) -> list[str]:
    names: list[str] = []
    seen = set()
    while len(names) < count:
        parts = rng.choice(len(_SYLLABLES), size=int(rng.integers(2, 4)), replace=False)
        name = "".join(_SYLLABLES[i] for i in parts).capitalize()
        if name not in seen and 4 <= len(name) <= 11:
            seen.add(name)
            names.append(name)
    return names


def _fact(rng: np.random.Generator, attribute: str) -> str:
    if attribute == "founded":
        return str(int(rng.integers(1200, 1990)))
    if attribute == "founder":
        return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    if attribute == "region":
        return str(rng.choice(_REGIONS))
    if attribute == "motto":
        first, second = rng.choice(_MOTTO_WORDS, size=2, replace=False)
        return f"{first} and {second}".capitalize()
    if attribute == "population":
        return f"{int(rng.integers(2, 900)) * 100:,}"
    if attribute == "emblem":
        return str(rng.choice(_ANIMALS))
    if attribute == "river":
        return _names(rng, 1)[0]
    if attribute == "language":
        return str(rng.choice(_LANGUAGES))
    raise ValueError(f"unknown attribute {attribute!r}")


# Where the 2 or 3 shapes of a sigil sit (centres as fractions of the canvas) and their radius.
_LAYOUTS = {
    2: (((0.3, 0.5), (0.7, 0.5)), ((0.5, 0.3), (0.5, 0.7)), ((0.32, 0.32), (0.68, 0.68))),
    3: (((0.28, 0.32), (0.72, 0.32), (0.5, 0.72)), ((0.25, 0.5), (0.5, 0.5), (0.75, 0.5)),
        ((0.3, 0.7), (0.7, 0.7), (0.5, 0.28))),
}


_COLOR_SETS = [c for k in (2, 3) for c in itertools.combinations(PALETTE, k)]
MAX_ENTITIES = len(_COLOR_SETS)  # one colour set per entity: 45 pairs + 120 triples of the 10 colours


def _sigils(rng: np.random.Generator, count: int) -> list[tuple[Shape, ...]]:
    """`count` sigils with pairwise different colour sets (so colour alone already tells entities apart)."""
    color_sets = _COLOR_SETS
    if count > len(color_sets):
        raise ValueError(f"at most {len(color_sets)} entities have distinct looks, got {count} (seen + unseen)")
    chosen = rng.permutation(len(color_sets))[:count]
    sigils = []
    for index in chosen:
        palette = list(color_sets[index])
        rng.shuffle(palette)
        layout = _LAYOUTS[len(palette)][int(rng.integers(len(_LAYOUTS[len(palette)])))]
        radius = 0.2 if len(palette) == 2 else 0.17
        striped = int(rng.integers(-1, len(palette)))  # -1: no stripes
        sigils.append(tuple(
            Shape(kind=str(rng.choice(SHAPE_KINDS)), color=color, center=center, radius=radius, striped=i == striped)
            for i, (color, center) in enumerate(zip(palette, layout))
        ))
    return sigils


def build_toy_world(
    num_entities: int = 48,
    num_unseen_entities: int = 16,
    num_attributes: int = 8,
    train_renderings: int = 6,
    eval_renderings: int = 1,
    image_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> ToyWorld:
    """
    Generate the toy world. `train_renderings` queries per (training entity, attribute) go to `train`;
    `eval_renderings` per (entity, attribute) to each of `validation` and `test` (and to `unseen` for the held-out
    entities). Every query has its own rendering and a paraphrase drawn at random. `progress` shows a progress bar.
    """
    from tqdm.auto import tqdm

    for name, value, low in (("num_entities", num_entities, 2), ("num_unseen_entities", num_unseen_entities, 0),
                             ("train_renderings", train_renderings, 1), ("eval_renderings", eval_renderings, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 2 <= num_attributes <= len(ATTRIBUTES):
        raise ValueError(f"num_attributes must be in [2, {len(ATTRIBUTES)}], got {num_attributes!r}")
    rng = np.random.default_rng(seed)
    total = num_entities + num_unseen_entities
    names = _names(rng, total)
    sigils = _sigils(rng, total)
    attributes = list(ATTRIBUTES)[:num_attributes]
    entities = [
        Entity(f"E{i:03d}", names[i], sigils[i], {a: _fact(rng, a) for a in attributes}) for i in range(total)
    ]

    seen, unseen = entities[:num_entities], entities[num_entities:]
    n_images = total + num_attributes * (num_entities * (train_renderings + 2 * eval_renderings)
                                         + num_unseen_entities * eval_renderings)
    bar = tqdm(total=n_images, desc="toy world: rendering", unit="image", disable=not progress)
    kb = []
    for entity in entities:
        canonical = render_sigil(entity.sigil, image_size)
        bar.update(1)
        for attribute in attributes:
            template = ATTRIBUTES[attribute][0]
            kb.append({
                "id": f"{entity.entity_id}-{attribute}",
                "text": template.format(name=entity.name, value=entity.facts[attribute]),
                "image": canonical,
                "entity": entity.entity_id,
                "attribute": attribute,
            })

    def queries(split: str, group: list[Entity], renderings: int) -> list[dict]:
        # one generator per split, so that changing one split's size never changes another split's pictures
        split_rng = np.random.default_rng([seed, list(SPLITS).index(split)])
        rows = []
        for entity in group:
            for attribute in attributes:
                for k in range(renderings):
                    paraphrases = ATTRIBUTES[attribute][1]
                    rows.append({
                        "id": f"{split}-{entity.entity_id}-{attribute}-{k}",
                        "question": paraphrases[int(split_rng.integers(len(paraphrases)))],
                        "image": render_sigil(entity.sigil, image_size, rng=split_rng),  # a fresh rendering
                        "positive_ids": [f"{entity.entity_id}-{attribute}"],
                        "entity": entity.entity_id,
                        "attribute": attribute,
                    })
                    bar.update(1)
        return rows

    splits = {
        "train": queries("train", seen, train_renderings),
        "validation": queries("validation", seen, eval_renderings),
        "test": queries("test", seen, eval_renderings),
        "unseen": queries("unseen", unseen, eval_renderings) if unseen else [],
    }
    bar.close()
    return ToyWorld(seed=seed, image_size=image_size, entities=seen, unseen_entities=unseen, kb=kb, splits=splits)


SPLITS = ("train", "validation", "test", "unseen")


def write_toy_world(world: ToyWorld, directory: str) -> dict[str, str]:
    """
    Write the world as files in the package's data format: `kb.jsonl`, `{split}.jsonl` (image paths relative to
    `directory`), `images/*.png` and `qrels.{split}.json`; returns {name: path}. Files are written to temporary
    names and renamed, so an interrupted write never leaves a complete-looking file.
    """
    import json
    import os

    from ..utils.io import atomic_path, atomic_write, write_json

    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    written_images: dict[int, str] = {}

    def image_path(image: Image.Image, name: str) -> str:
        if id(image) not in written_images:  # the KB shares one canonical image per entity
            relative = f"images/{name}.png"
            target = os.path.join(directory, relative)
            with atomic_path(target) as tmp:
                image.save(tmp, format="PNG")
            written_images[id(image)] = relative
        return written_images[id(image)]

    def write_jsonl(name: str, rows: list[dict]) -> str:
        path = os.path.join(directory, name)
        with atomic_write(path) as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        return path

    paths = {"kb": write_jsonl("kb.jsonl", [
        {**row, "image": image_path(row["image"], f"kb-{row['entity']}")} for row in world.kb
    ])}
    for split, rows in world.splits.items():
        paths[split] = write_jsonl(f"{split}.jsonl", [{**row, "image": image_path(row["image"], row["id"])} for row in rows])
        qrels_path = os.path.join(directory, f"qrels.{split}.json")
        write_json(qrels_path, world.qrels(split), indent=None)
    return paths


def contact_sheet(images: list[Image.Image], columns: int = 8) -> Image.Image:
    """Tile images in a grid (for looking at the data)."""
    size = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * size[0], rows * size[1]), (255, 255, 255))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * size[0], (i // columns) * size[1]))
    return sheet


__all__ = ["ATTRIBUTES", "MAX_ENTITIES", "SPLITS", "Entity", "ToyWorld", "build_toy_world", "contact_sheet", "write_toy_world"]
