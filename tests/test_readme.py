"""The README runs: every code block, top to bottom, in one working directory, as a user following it would.

- ```python blocks are executed in one namespace (those marked `<!-- no-test: ... -->` are skipped: they need the
  reader's own data);
- ```yaml blocks are config files: their first line names the file (`# train.yaml`), written where a user saves it;
- ```bash blocks run command by command. Blocks marked `<!-- test: network -->` reach the Hub: they run in a shell
  against the local Hub server (`tests/hub_server.py`), which serves the ids they name with the real architectures
  (`tests/hub_models.py`). Blocks marked `<!-- test: ci -->` (install, test suite) are what `.ci/run` executes: a
  test checks they are its lines. Other commands run in-process when they are a plain `vl-joint-encoder ...` line
  (no new Python process to start: the suite stays fast), in a shell otherwise (`sed ... > file`).

Data the README's commands read is generated here, in the layouts they name: the demo's outputs, tiny VL-T5 /
VL-Adapter / VL-BART / VL-Adapter-BART checkpoints and tiny T5 / BART folders (the conversion block), a ViQuAE
miniature in the authors' published layout (`tests/viquae_miniature.py`: the recipe's input). What the test
changes, and why (`ADAPTATIONS`):
- `vl-joint-encoder demo` is the session's demo run (`conftest.demo_run`: the same command at test size);
- `accelerate launch ... -m vl_joint_encoder CMD` runs `CMD` as one process on the CPU (the multi-process launches
  are tested by test_train_cli.py and test_encode.py);
- `train` runs 4 steps (checkpoints every 2, for the resume) instead of the configs' epochs;
- `examples/viquae/run.sh --small` trains 4 steps (`VIQUAE_MAX_STEPS=4`) instead of 200.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"(?:<!-- (?P<mark>test|no-test): ?(?P<note>[^>]*?) ?-->\n)?```(?P<lang>python|bash|yaml)\n(?P<body>.*?)```", re.S)
SHELL_SYNTAX = re.compile(r"[|&;<>$`]")
TRAIN_STEPS = ["--max-steps", "4", "--save-strategy", "steps", "--save-steps", "2"]
ADAPTATIONS = {
    "demo": "the session's demo run, at test size",
    "accelerate launch": "one in-process run on the CPU",
    "train": " ".join(TRAIN_STEPS) + " (a resumed run: --max-steps 6)",
    "examples/viquae/run.sh": "VIQUAE_MAX_STEPS=4 (4 training steps)",
}


@dataclass
class Block:
    line: int
    lang: str
    mark: str | None
    note: str
    body: str


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    return [
        Block(text[: m.start()].count("\n") + 1, m["lang"], m["mark"], (m["note"] or "").strip(), m["body"])
        for m in BLOCK.finditer(text)
    ]


def commands(body: str) -> list[str]:
    """A bash block's commands: `\\`-continued lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            result.append(line)
    return result


def python_blocks():  # kept for the quick test below
    return [(b.line, b.body) for b in readme_blocks() if b.lang == "python" and b.mark != "no-test"]


# ------------------------------------------------------------------------------------------------ quick checks
def test_readme_has_runnable_blocks():
    blocks = readme_blocks()
    assert len(python_blocks()) >= 3
    assert sum(b.lang == "bash" and b.mark != "test" for b in blocks) >= 6
    for block in blocks:
        if block.lang == "bash":
            assert block.mark != "no-test", f"README.md:{block.line}: every shell block runs in a test"
            assert block.mark is None or block.note in ("ci", "network"), f"README.md:{block.line}: {block.note!r}"
        if block.lang == "yaml":
            first = block.body.splitlines()[0]
            assert re.match(r"# [\w.-]+\.ya?ml\b", first), f"README.md:{block.line}: a yaml block names its file"


def test_ci_runs_the_readme_install_and_test_commands():
    """The README's install and test commands are what CI runs (with the venv in $VENV)."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    ci_blocks = [b for b in readme_blocks() if b.mark == "test" and b.note == "ci"]
    assert len(ci_blocks) == 2
    for block in ci_blocks:
        for command in commands(block.body):
            expected = command.replace("python3 -m venv .venv", 'python3 -m venv "$VENV"').replace(
                ". .venv/bin/activate", '. "$VENV/bin/activate"'
            )
            assert expected in ci, f"README.md:{block.line}: .ci/run does not run {command!r}"


def test_readme_next_steps_are_what_the_demo_prints():
    from vl_joint_encoder.demo.run import next_steps

    block = next(b for b in readme_blocks() if b.lang == "bash" and "--qrels vl-joint-encoder-demo" in b.body)
    printed = next_steps("vl-joint-encoder-demo")
    assert commands(block.body) == printed[: len(commands(block.body))]


def _extra(name: str) -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    section = parser["options.extras_require"][name] if name != "install" else parser["options"]["install_requires"]
    return {re.split(r"[<>=!~\[ ]", line.strip())[0].lower().replace("_", "-") for line in section.splitlines() if line.strip()}


def test_the_all_extra_installs_what_the_readme_imports():
    from importlib.metadata import packages_distributions

    distributions = packages_distributions()
    available = _extra("all") | _extra("install")
    imported = set()
    for block in readme_blocks():
        if block.lang == "python":
            imported |= set(re.findall(r"^\s*(?:from|import) ([A-Za-z_]\w*)", block.body, re.M))
    missing = []
    for module in sorted(imported - {"vl_joint_encoder", "os", "json", "sys"}):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
        if module not in sys.stdlib_module_names and not names & available:
            missing.append(f"{module} ({sorted(names)})")
    assert not missing, f"README imports what `pip install -e '.[all]'` does not install: {missing}"


# ------------------------------------------------------------------------------------------------ the full run
def write_fixtures(root: Path, demo_dir: str, hub_folders: dict) -> None:
    """The files the README's commands read, in the layouts they name (see the module docstring)."""
    import torch
    from hub_models import T5_BASE
    from test_conversion import original_checkpoint
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from vl_joint_encoder.tokenization_joint_encoder import build_vl_t5_tokenizer, train_vl_t5_tokenizer

    shutil.copytree(demo_dir, root / "vl-joint-encoder-demo")
    # VL-T5 / VL-Adapter checkpoints trained with the (served) google-t5/t5-base tokenizer
    vocab_size = len(build_vl_t5_tokenizer(AutoTokenizer.from_pretrained(hub_folders[T5_BASE])))
    (root / "snap/pretrain/VLT5").mkdir(parents=True)
    torch.save(original_checkpoint(seed=1, vocab_size=vocab_size)[0], root / "snap/pretrain/VLT5/Epoch30.pth")
    # VL-Adapter files take 64-d grids: the width of the tiny CLIP ResNet standing in for RN101.pt (below)
    torch.save(original_checkpoint(seed=2, tasks=("vqa", "gqa"), vocab_size=vocab_size, feat_dim=64)[0],
               root / "LAST.pth")  # fmt: skip
    # ./t5-small: a transformers T5 folder with its tokenizer (tiny)
    tokenizer = train_vl_t5_tokenizer(["who built this bridge", "a red bridge over a river"] * 20, vocab_size=40,
                                      n_vis=0)  # fmt: skip
    torch.manual_seed(3)
    T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                        num_heads=4, relative_attention_num_buckets=8)).save_pretrained(root / "t5-small")
    tokenizer.save_pretrained(root / "t5-small")
    # VL-BART / VL-Adapter-BART checkpoints and ./bart-base (a transformers BART folder): bart-base's width (768, so
    # the converter's default of 12 heads applies, as for the released files), one layer, the tiny BART tokenizer
    from transformers import BartConfig, BartForConditionalGeneration
    from vl_bart_fixtures import (
        BASE_VOCAB_SIZE,
        bart_config_kwargs,
        build_tiny_bart_tokenizer,
        save_checkpoint,
        vl_adapter_bart_state_dict,
        vl_bart_state_dict,
    )

    width = dict(d_model=768, encoder_layers=1, decoder_layers=1, ffn_dim=64)
    save_checkpoint(vl_bart_state_dict(1, **width), root / "snap/pretrain/VLBart/Epoch30.pth")
    save_checkpoint(vl_adapter_bart_state_dict(2, **width, feat_dim=64), root / "snap/VLBart_multitask/LAST.pth")
    write_visual_feature_fixtures(root)
    torch.manual_seed(4)
    bart_kwargs = {**bart_config_kwargs(vocab_size=BASE_VOCAB_SIZE), "d_model": 768, "encoder_layers": 1,
                   "decoder_layers": 1, "encoder_attention_heads": 12, "decoder_attention_heads": 12,
                   "encoder_ffn_dim": 64, "decoder_ffn_dim": 64}  # fmt: skip
    BartForConditionalGeneration(BartConfig(**bart_kwargs)).save_pretrained(root / "bart-base")
    build_tiny_bart_tokenizer(with_extra_tokens=False).save_pretrained(root / "bart-base")
    # ViQuAE as its authors publish it (questions, the three article files, passages, images): the recipe's input
    from viquae_miniature import write_viquae_miniature

    write_viquae_miniature(root, n_articles=48)  # ~170 passages, 22 training questions: a batch of 16 fits
    shutil.copytree(ROOT / "examples", root / "examples")  # the README's commands run from the repository root


def write_visual_feature_fixtures(root: Path) -> None:
    """`RN101.pt`: a tiny CLIP ResNet in OpenAI's layout (64-d grid, 7 x 7 at 224 px, random weights); `kb-photos.jsonl`
    (the photos of the Images section by id); `val2014_obj36.h5`: 36 regions (16-d, the VL-BART fixture's feat_dim)
    with boxes per photo, in VL-T5's layout."""
    import h5py
    import numpy as np
    import torch
    from reference_clip_resnet import random_openai_visual_state_dict

    torch.save(random_openai_visual_state_dict(layers=(1, 1, 1, 1), width=2, image_size=224, output_dim=8, seed=3),
               root / "RN101.pt")  # fmt: skip
    names = {"coffee": "a cup of coffee", "astronaut": "an astronaut", "chelsea": "a cat", "rocket": "a rocket"}
    (root / "kb-photos.jsonl").write_text(
        "".join(json.dumps({"id": f"p-{n}", "text": t, "image": n}) + "\n" for n, t in names.items())
    )
    rng = np.random.default_rng(0)
    with h5py.File(root / "val2014_obj36.h5", "w") as f:
        for name in names:
            group = f.create_group(name)
            xy = rng.uniform(0, 200, (36, 2))
            group["boxes"] = np.concatenate([xy, xy + rng.uniform(10, 200, (36, 2))], 1).astype(np.float32)
            group["features"] = rng.standard_normal((36, 16)).astype(np.float32)
            group["img_w"], group["img_h"] = 400, 400


def run_in_process(argv: list[str]) -> int:
    from vl_joint_encoder.cli import main

    try:
        return int(main(argv) or 0)
    except SystemExit as exit_:
        return int(exit_.code or 0)


def tokens(command: str) -> list[str]:
    """The words of a command line, comments dropped; shell operators (`>`, `&&`, `|`, ...) as their own words."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars="|&;<>")
    lexer.whitespace_split = True
    return list(lexer)


def adapt(command: str) -> list[str] | None:
    """The argv of an in-process run (ADAPTATIONS applied), or None: run `command` in a shell."""
    words = tokens(command)
    if any(set(word) <= set("|&;<>") or "$" in word for word in words):
        return None
    if words[0] == "accelerate":  # accelerate launch [options] -m vl_joint_encoder CMD ...
        argv = words[words.index("vl_joint_encoder") + 1:]
    elif words[0] == "vl-joint-encoder":
        argv = words[1:]
    else:
        return None
    if argv[0] == "train":
        argv += TRAIN_STEPS
        if "--resume-from-checkpoint" in argv:  # a resumed run goes further than the one it resumes (else: refused)
            argv[argv.index("--max-steps") + 1] = "6"
    return argv


@pytest.mark.slow  # the whole README: ~3 min on 2 shared cores (a 768-d build, conversions, 4 trainings)
def test_readme_runs_top_to_bottom(tmp_path, monkeypatch, demo_run, model_hub):
    monkeypatch.chdir(tmp_path)
    demo_dir, _ = demo_run
    write_fixtures(tmp_path, demo_dir, model_hub.folders)
    network_env = model_hub.env(tmp_path / "hf_home")
    shell_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                 "VIQUAE_MAX_STEPS": "4"}  # ADAPTATIONS["examples/viquae/run.sh"]
    namespace: dict = {"__name__": "__readme__"}
    timings: list[tuple[float, str]] = []  # (seconds, command): printed at the end (pytest -s, or on failure)
    for block in readme_blocks():
        where = f"README.md:{block.line}"
        if block.mark == "no-test" or (block.mark == "test" and block.note == "ci"):
            continue
        if block.lang == "python":
            started = time.perf_counter()
            try:
                exec(compile(block.body, where, "exec"), namespace)
            except Exception as error:  # pragma: no cover - the message is the point
                raise AssertionError(f"{where}: the Python block failed: {error!r}") from error
            timings.append((round(time.perf_counter() - started, 1), f"python block at {where}"))
        elif block.lang == "yaml":
            name = re.match(r"# ([\w.-]+\.ya?ml)", block.body)[1]
            (tmp_path / name).write_text(block.body)
        else:
            for command in commands(block.body):
                if tokens(command) == ["vl-joint-encoder", "demo"]:
                    continue  # ADAPTATIONS["demo"]: its outputs were copied in by write_fixtures
                argv = adapt(command)
                started = time.perf_counter()
                if argv is not None and block.note != "network":
                    code, output = run_in_process(argv), ""
                else:
                    result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, text=True,
                                            capture_output=True, timeout=600,
                                            env={**network_env, "PATH": shell_env["PATH"]} if block.note == "network"
                                            else shell_env)  # fmt: skip
                    code, output = result.returncode, (result.stdout + result.stderr)[-4000:]
                assert code == 0, f"{where}: `{command}` exited with {code}\n{output}"
                timings.append((round(time.perf_counter() - started, 1), command[:90]))
    print("\n".join(f"{seconds:6.1f} s  {command}" for seconds, command in sorted(timings, reverse=True)))
    # what the blocks promise, checked on their outputs
    for folder in ("pipeline", "feats-photos", "t5-base-clip", "vlt5-clip", "vladapter-vqa-features", "vlt5-encoder",
                   "vladapter-vqa", "vlbart-encoder", "vladapter-bart-vqa", "t5-joint-encoder", "bart-joint-encoder", "trained",
                   "kb_emb", "kb_hnsw", "feats", "viquae-run",
                   "kb_emb_features", "feats-rn101", "kb_emb_rn101", "kb_emb_regions"):  # fmt: skip
        assert (tmp_path / folder).is_dir(), folder
    demo_qrels = json.loads((tmp_path / "vl-joint-encoder-demo/data/qrels.test.json").read_text())
    assert json.loads((tmp_path / "qrels.json").read_text()) == demo_qrels  # `qrels` = the demo's own qrels
    assert "user/vlt5-encoder" in model_hub.repos
    for run in ("run.json", "run-features.json"):
        assert set(json.loads((tmp_path / run).read_text())) == set(demo_qrels)
