"""Model cards from a template and a dataclass of collected facts (as sentence-transformers does).

`render_model_card("converted_model_card", card_data=..., **facts)` finds the template (a path, or a name looked up
in the repository's `model_cards/` folder and then in the package's `templates/`), checks that every variable it
uses is given, and renders it with `huggingface_hub.ModelCard.from_template` (Jinja2). See
https://huggingface.co/docs/huggingface_hub/guides/model-cards.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData


_PACKAGE_DIR = Path(__file__).resolve().parent.parent
TEMPLATE_DIRS = (
    _PACKAGE_DIR.parent / "model_cards",  # source checkout
    _PACKAGE_DIR / "templates",  # installed package data
)

CITATIONS = {
    "vl_t5": """@inproceedings{cho2021vlt5,
  title     = {Unifying Vision-and-Language Tasks via Text Generation},
  author    = {Cho, Jaemin and Lei, Jie and Tan, Hao and Bansal, Mohit},
  booktitle = {Proceedings of the 38th International Conference on Machine Learning (ICML)},
  year      = {2021},
  url       = {https://arxiv.org/abs/2102.02779}
}""",
    "vl_adapter": """@inproceedings{sung2022vladapter,
  title     = {VL-Adapter: Parameter-Efficient Transfer Learning for Vision-and-Language Tasks},
  author    = {Sung, Yi-Lin and Cho, Jaemin and Bansal, Mohit},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022},
  url       = {https://arxiv.org/abs/2112.06825}
}""",
    "bart": """@inproceedings{lewis2020bart,
  title     = {{BART}: Denoising Sequence-to-Sequence Pre-training for Natural Language Generation, Translation, and
               Comprehension},
  author    = {Lewis, Mike and Liu, Yinhan and Goyal, Naman and Ghazvininejad, Marjan and Mohamed, Abdelrahman and
               Levy, Omer and Stoyanov, Veselin and Zettlemoyer, Luke},
  booktitle = {Proceedings of the 58th Annual Meeting of the Association for Computational Linguistics (ACL)},
  year      = {2020},
  url       = {https://aclanthology.org/2020.acl-main.703}
}""",
    "t5": """@article{raffel2020t5,
  title   = {Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer},
  author  = {Raffel, Colin and Shazeer, Noam and Roberts, Adam and Lee, Katherine and Narang, Sharan and
             Matena, Michael and Zhou, Yanqi and Li, Wei and Liu, Peter J.},
  journal = {Journal of Machine Learning Research},
  volume  = {21},
  number  = {140},
  pages   = {1--67},
  year    = {2020},
  url     = {https://jmlr.org/papers/v21/20-074.html}
}""",
}


def resolve_template(template_path_or_name: str | Path) -> Path:
    """A template file: the path itself if it exists, else `<name>.md` (or `<name>`) in TEMPLATE_DIRS."""
    path = Path(template_path_or_name)
    if path.is_file():
        return path
    names = [path.name] if path.suffix == ".md" else [f"{path.name}.md", path.name]
    for folder in TEMPLATE_DIRS:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    searched = ", ".join(str(folder) for folder in TEMPLATE_DIRS)
    raise ValueError(
        f"model card template {str(template_path_or_name)!r} not found (a path, or a name in: {searched})"
    )


def template_variables(template_path: str | Path) -> set[str]:
    """Top-level variables a Jinja template reads."""
    import jinja2
    from jinja2 import meta

    source = Path(template_path).read_text(encoding="utf-8")
    return meta.find_undeclared_variables(jinja2.Environment().parse(source))


def render_model_card(
    template_path_or_name: str | Path,
    card_data: ModelCardData | dict | None = None,
    **facts: Any,
) -> ModelCard:
    """
    Render a model card. `card_data` becomes the YAML metadata header (`{{ card_data }}` in the template); `facts`
    (plain values, or one dataclass instance passed as `facts=...`, whose fields are spread) fill the body.
    Raises a ValueError naming any variable the template uses that is not given, instead of rendering a blank.
    """
    template = resolve_template(template_path_or_name)
    if "facts" in facts and dataclasses.is_dataclass(facts["facts"]):
        facts = {**dataclasses.asdict(facts.pop("facts")), **facts}
    if card_data is None:
        card_data = ModelCardData()
    elif isinstance(card_data, dict):
        card_data = ModelCardData(**card_data)
    given = set(facts) | set(card_data.to_dict()) | {"card_data"}
    missing = sorted(template_variables(template) - given)
    if missing:
        raise ValueError(f"model card template {template.name} needs values for {missing}; pass them as facts")
    return ModelCard.from_template(card_data, template_path=str(template), **facts)


__all__ = ["CITATIONS", "render_model_card", "resolve_template", "template_variables"]
