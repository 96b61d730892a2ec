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
    "clip": """@inproceedings{radford2021clip,
  title     = {Learning Transferable Visual Models From Natural Language Supervision},
  author    = {Radford, Alec and Kim, Jong Wook and Hallacy, Chris and Ramesh, Aditya and Goh, Gabriel and
               Agarwal, Sandhini and Sastry, Girish and Askell, Amanda and Mishkin, Pamela and Clark, Jack and
               Krueger, Gretchen and Sutskever, Ilya},
  booktitle = {Proceedings of the 38th International Conference on Machine Learning (ICML)},
  year      = {2021},
  url       = {https://arxiv.org/abs/2103.00020}
}""",
    "siglip": """@inproceedings{zhai2023siglip,
  title     = {Sigmoid Loss for Language Image Pre-Training},
  author    = {Zhai, Xiaohua and Mustafa, Basil and Kolesnikov, Alexander and Beyer, Lucas},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2023},
  url       = {https://arxiv.org/abs/2303.15343}
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


def usage_code(
    model_path: str, has_tower: bool, feat_dim: int | None = None, separate_towers: bool = False,
    has_processor: bool = True,
) -> str:  # fmt: skip
    """
    The model card's usage snippet: processor + model + one image (or its precomputed features) + one question,
    scored against one passage with the model's own similarity. It runs as written (the image or features are made
    in the snippet; a comment says where real ones go), so a test can execute every card's snippet. Without a saved
    processor (a tokenizer only), features go to the model directly.
    """
    query_model, passage_model = ("query_encoder", "passage_encoder") if separate_towers else ("model", "model")
    folder = f"{model_path}/query_encoder" if separate_towers else model_path
    use_images = has_tower and has_processor
    lines = ["import torch"]
    if use_images:
        lines.append("from PIL import Image")
    lines += [f"from transformers import AutoModel, {'AutoProcessor' if has_processor else 'AutoTokenizer'}", ""]
    if separate_towers:
        lines += [
            f'query_encoder = AutoModel.from_pretrained("{model_path}/query_encoder", trust_remote_code=True).eval()',
            f'passage_encoder = AutoModel.from_pretrained("{model_path}/passage_encoder", trust_remote_code=True).eval()',
        ]
    else:
        lines.append(f'model = AutoModel.from_pretrained("{model_path}", trust_remote_code=True).eval()')
    question, passage = '"what is the name of this building?"', '"The Eiffel Tower is a wrought-iron lattice tower in Paris."'
    if has_processor:
        lines.append(f'processor = AutoProcessor.from_pretrained("{folder}", trust_remote_code=True)')
    else:
        lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{folder}")')
    if use_images:
        lines += [
            'image = Image.new("RGB", (640, 480), (180, 120, 60))  # your photo: Image.open("photo.jpg").convert("RGB")',
            f'query = processor(text=[{question}], images=[image], return_tensors="pt")',
        ]
    elif has_processor:
        lines += [
            f"features = torch.randn(36, {feat_dim})  # (regions, feat_dim): your image's precomputed features",
            "boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(36, 1)  # (regions, 4): x1, y1, x2, y2 in [0, 1]",
            f'query = processor(text=[{question}], visual_feats=[features], boxes=[boxes], return_tensors="pt")',
        ]
    else:
        lines += [
            f'query = dict(tokenizer([{question}], return_tensors="pt"))',
            f"query[\"visual_feats\"] = torch.randn(1, 36, {feat_dim})  # (1, regions, feat_dim): your image's features",
            'query["visual_pos"] = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]).repeat(1, 36, 1)  # boxes x1, y1, x2, y2 in [0, 1]',
        ]
    encode_text = "processor" if has_processor else "tokenizer"
    lines += [
        f'passage = {encode_text}(text=[{passage}], return_tensors="pt")',
        "with torch.no_grad():",
        f"    q, p = {query_model}.encode(**query), {passage_model}.encode(**passage)  # (1, embedding size)",
        f"    score = {query_model}.similarity(q, p)  # (1, 1): the score the model was trained and searches with",
        "print(q.shape, float(score))",
    ]
    return "\n".join(lines)


__all__ = ["CITATIONS", "render_model_card", "resolve_template", "template_variables", "usage_code"]
