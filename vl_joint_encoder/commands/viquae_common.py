"""Arguments shared by the `viquae-*` commands (not a command itself): where the published data is, and what the
model reads of it. No torch import here: `--help` answers before anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


HUB_QUESTIONS = "PaulLerner/viquae_dataset"  # = viquae.loading.HUB_*: not imported, that module loads transformers
HUB_ARTICLES = "PaulLerner/viquae_wikipedia"
HUB_PASSAGES = "PaulLerner/viquae_v4-alpha_passages"


@dataclass
class ViquaeSourceArguments:
    questions: str = field(
        default=HUB_QUESTIONS,
        metadata={"help": "viquae_dataset: hub id, save_to_disk copy, or folder of {train,validation,test}.jsonl "
                  "(after viquae-prepare: its questions/ folder)"},
    )
    articles: str = field(
        default=HUB_ARTICLES,
        metadata={"help": "viquae_wikipedia: hub id, folder of its three .jsonl.gz files, or a save_to_disk copy "
                  "(after viquae-prepare: its articles/ folder)"},
    )
    passages: str = field(default=HUB_PASSAGES, metadata={"help": "viquae_v4-alpha_passages: hub id or save_to_disk copy"})
    image_root: str | None = field(
        default=None, metadata={"help": "the images folder (default: $VIQUAE_IMAGES_PATH)"}
    )


@dataclass
class ViquaeInputArguments:
    title_mode: Literal["keep", "replace", "title_column"] = field(
        default="keep",
        metadata={"help": "passage title prefix '<title> [SEP] ': keep it, replace ' [SEP] ' by --title-separator, or "
                  "rebuild it from the articles' --title-column"},
    )
    title_separator: str = field(default=". ", metadata={"help": "what replaces ' [SEP] ' (replace / title_column)"})
    title_column: str = field(default="wikipedia_title", metadata={"help": "article title column (title_column mode)"})
    image_vectors_column: str | None = field(
        default=None,
        metadata={"help": "global image vectors (e.g. clip-RN50) in this column of the articles and questions: one "
                  "visual token each"},
    )
    image_vectors: str | None = field(
        default=None, metadata={"help": "global image vectors: the pooled vectors of an extract-features folder"}
    )
    on_missing_image: Literal["error", "skip"] = field(
        default="error", metadata={"help": "an image file missing: error, or skip (used without image)"}
    )
    check_titles: int = field(
        default=1000, metadata={"help": "passages checked to start with their article's title (0: no check)"}
    )

    def build(self, sources: ViquaeSourceArguments, questions: dict, use_images: bool = True):
        from ..viquae.inputs import build_inputs
        from ..viquae.loading import image_root

        return build_inputs(
            sources.passages, sources.articles, questions, image_root=image_root(sources.image_root),
            use_images=use_images, vectors_column=self.image_vectors_column, vectors_folder=self.image_vectors,
            title_mode=self.title_mode, title_separator=self.title_separator, title_column=self.title_column,
            on_missing_image=self.on_missing_image, check_titles=self.check_titles,
        )  # fmt: skip


def parse_named_paths(values: list[str], what: str) -> dict[str, str]:
    """`["bm25=runs/bm25.json", ...]` -> `{"bm25": "runs/bm25.json", ...}` (names unique)."""
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{what}: {value!r} is not NAME=PATH")
        if name in out:
            raise ValueError(f"{what}: the name {name!r} is given twice")
        out[name] = path
    return out


__all__ = ["ViquaeInputArguments", "ViquaeSourceArguments", "parse_named_paths"]
