"""The `vl-joint-encoder` entry point: every command starts, both option spellings work, the README reference is
the parsers' own help."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vl_joint_encoder import cli
from vl_joint_encoder.commands import reference


README = Path(__file__).resolve().parent.parent / "README.md"


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert f"  {command} " in out


def test_unknown_command_is_refused(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_prints_its_help_with_one_spelling_and_a_help_text_per_option(command):
    """`build_parser` refuses an option without help text; the help shows `--long-option` only (both parse)."""
    text = reference.help_text(command)
    assert text.startswith(f"usage: vl-joint-encoder {command}"), text[:200]
    shown = re.findall(r"^\s{2,}(--[\w-]+)", text, re.M)  # the option column
    assert shown and not [option for option in shown if "_" in option], text[:2000]
    assert "(default: None)" not in text and "[OVERWRITE]" not in text


HEAVY = ("torch", "transformers", "datasets", "accelerate", "faiss", "ranx", "numba", "PIL")


@pytest.mark.parametrize(
    "argv, code",
    [([command, "--help"], 0) for command in cli.COMMANDS]
    + [
        (["train", "--kb", "kb.jsonl"], 2),  # --model-name-or-path and --train-queries missing
        (["train", "--model-name-or-path", "m", "--train-queries", "q", "--kb", "k", "--per-device-batch", "3"], 2),
        (["train", "--model-name-or-path", "m", "--train-queries", "q", "--kb", "k", "--eval-strategy", "often"], 2),
        (["build", "--text", "t5-base"], 2),  # --output-dir missing
        (["qrels", "--queries", "q.jsonl", "--kb", "kb.jsonl", "--output", "qrels.trec"], 2),  # JSON only
    ],
)
def test_help_and_argument_errors_are_fast_and_load_nothing_heavy(argv, code):
    """In a fresh process, as a user runs them: no torch / transformers before the answer, well under a second."""
    script = (
        "import json, sys, time\n"
        "started = time.perf_counter()\n"
        "from vl_joint_encoder.cli import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as exit_:\n"
        "    code = exit_.code\n"
        f"print(json.dumps({{'code': code, 'seconds': time.perf_counter() - started, "
        f"'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["code"] == code, result.stderr[-2000:]
    assert out["loaded"] == [], out
    assert out["seconds"] < 2.0, out  # ~0.05 s idle; generous for a busy 2-core CI machine


def test_train_help_lists_the_package_options_before_training_arguments():
    text = reference.help_text("train")
    positions = [text.index(marker) for marker in ("\nmodel:", "\n  --model-name-or-path", "\ndata:",
                                                     "\n  --train-queries", "\nretrieval training", "\n  --n-hard-negatives",
                                                     "\nTrainingArguments (transformers):",
                                                     "\n  --per-device-train-batch-size")]  # fmt: skip
    assert positions == sorted(positions)
    assert "--logging-steps" in text.split("TrainingArguments (transformers):")[1]
    assert "(default: 10)" in text.split("--logging-steps", 1)[1][:400]  # this command's default


def test_train_options_table_is_the_real_parser():
    """`train --help` and its argument errors come from train_options.json (no torch): it must describe the real
    parser exactly, help text included (regenerate: python -m vl_joint_encoder.commands.train --write-options-table)."""
    import contextlib
    import io

    from vl_joint_encoder.commands import command_module, train

    stored = json.loads(open(train.OPTIONS_TABLE).read())
    assert stored == json.loads(json.dumps(train.options_tables())), (
        "vl_joint_encoder/commands/train_options.json is out of date: run "
        "`python -m vl_joint_encoder.commands.train --write-options-table`"
    )
    assert set(stored["commands"]) == {"train", "viquae-train"}
    for command in stored["commands"]:
        texts = []
        for parser in (train.fast_parser(command), command_module(command).full_parser()):
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                parser.print_help()
            texts.append(buffer.getvalue())
        assert texts[0] == texts[1], command


def test_config_file_values_and_both_spellings_reach_the_dataclasses(tmp_path):
    from vl_joint_encoder.commands import parse_arguments
    from vl_joint_encoder.commands.encode import EncodeArguments
    from vl_joint_encoder.commands.train import parse

    (tmp_path / "encode.yaml").write_text("model: m\nkb: kb.jsonl\noutput-dir: out\nbatch_size: 8\n")
    (args,) = parse_arguments([EncodeArguments], [str(tmp_path / "encode.yaml"), "--batch-size", "16", "--cpu"],
                              "vl-joint-encoder encode")  # fmt: skip
    assert (args.model, args.output_dir, args.batch_size, args.cpu) == ("m", "out", 16, True)
    model_args, data_args, training_args = parse(
        ["--model_name_or_path", "m", "--train-queries", "q.jsonl", "--kb", "k.jsonl", "--output_dir",
         str(tmp_path / "o"), "--n-hard-negatives", "2", "--use_cpu", "--no-use-query-images"]
    )  # fmt: skip
    assert model_args.model_name_or_path == "m" and data_args.train_queries == ["q.jsonl"]
    assert (training_args.n_hard_negatives, training_args.use_query_images, training_args.logging_steps) == (2, False, 10)


def test_console_script_is_installed():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "vl-joint-encoder"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "extract-features" in result.stdout


def test_both_spellings_of_long_options_are_accepted(tmp_path, capsys):
    # `--output-dir` for a parser that declares `--output_dir`: parsed (then refused for the missing manifest)
    code = cli.main(["index", "--embeddings", str(tmp_path), "--output-dir", str(tmp_path / "index")])
    assert code != 0 and "has no manifest.json" in capsys.readouterr().err
    # and an option that does not exist in either spelling is still an error
    with pytest.raises(SystemExit):
        cli.main(["index", "--embeddings", str(tmp_path), "--output-dir", str(tmp_path), "--no-such-option", "1"])


def readme_reference() -> str:
    """The package commands' reference, then the conversion script's help (a separate script, not a command)."""
    import contextlib
    import io
    import os

    from conversion.convert_vl_t5_checkpoint import build_parser

    buffer, previous = io.StringIO(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(reference.HELP_COLUMNS)
    try:
        with contextlib.redirect_stdout(buffer):
            build_parser().print_help()
    finally:
        os.environ.pop("COLUMNS") if previous is None else os.environ.__setitem__("COLUMNS", previous)
    conversion = (
        "<details><summary><code>python -m conversion.convert_vl_t5_checkpoint</code>: convert a VL-T5 / "
        f"VL-Adapter / VL-BART / T5 / BART checkpoint</summary>\n\n```text\n{buffer.getvalue().rstrip()}\n```\n\n"
        "</details>"
    )
    return reference.markdown_reference() + "\n\n" + conversion


def test_readme_cli_reference_is_the_parsers_help():
    readme = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- cli-help:begin -->\n(.*)\n<!-- cli-help:end -->", readme, re.S)
    assert block, "README.md lost its <!-- cli-help:begin/end --> markers"
    assert block.group(1).strip() == readme_reference().strip(), (
        "README's CLI reference is out of date: regenerate it with `python tests/test_cli.py` (from the repository "
        "root)"
    )


if __name__ == "__main__":  # regenerate the README's CLI reference in place
    sys.path.insert(0, str(README.parent))  # the repository root: `conversion` is importable
    text = README.read_text(encoding="utf-8")
    begin, end = "<!-- cli-help:begin -->\n", "\n<!-- cli-help:end -->"
    head, rest = text.split(begin, 1)
    README.write_text(head + begin + readme_reference() + end + rest.split(end, 1)[1], encoding="utf-8")


# ------------------------------------------------------------------------------------------------ qrels
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_qrels_from_positives_checked_against_the_kb(tmp_path, capsys):
    kb = write_jsonl(tmp_path / "kb.jsonl", [{"id": f"p{i}", "text": f"passage {i}"} for i in range(4)])
    queries = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "a", "question": "?", "positive_ids": ["p1", "p3"]},
        {"id": "b", "question": "?", "positive_ids": ["p0"]},
        {"id": "c", "question": "?", "positive_ids": []},
    ])  # fmt: skip
    out = tmp_path / "qrels.json"
    assert cli.main(["qrels", "--queries", queries, "--kb", kb, "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == {"a": {"p1": 1, "p3": 1}, "b": {"p0": 1}}
    printed = capsys.readouterr().out
    assert "qrels of 2 queries (3 relevant passages)" in printed and "1 queries without a positive" in printed
    # an existing output is kept unless --overwrite
    with pytest.raises(SystemExit):
        cli.main(["qrels", "--queries", queries, "--kb", kb, "--output", str(out)])
    assert "--overwrite" in capsys.readouterr().err
    # a positive missing from the KB is named, and nothing is written
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "question": "?", "positive_ids": ["p9"]}])
    assert cli.main(["qrels", "--queries", bad, "--kb", kb, "--output", str(tmp_path / "bad.json")]) == 2
    assert "'a'->'p9'" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()


def test_qrels_of_viquae_columns_use_passage_rows(tmp_path):
    """ViQuAE's positives are passage rows (provenance_indices) into a KB whose ids are its rows."""
    from datasets import Dataset, DatasetDict

    Dataset.from_list([{"passage": f"text {i}", "index": i} for i in range(5)]).save_to_disk(tmp_path / "passages")
    DatasetDict({"validation": Dataset.from_list([
        {"id": "v1", "input": "who?", "provenance_indices": [4, 2]}, {"id": "v2", "input": "what?",
                                                                        "provenance_indices": [0]},
    ])}).save_to_disk(tmp_path / "dataset")  # fmt: skip
    out = tmp_path / "qrels.json"
    assert cli.main(["qrels", "--queries", str(tmp_path / "dataset" / "validation"), "--kb", str(tmp_path / "passages"),
                     "--columns", "viquae", "--output", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text()) == {"v1": {"4": 1, "2": 1}, "v2": {"0": 1}}


# ------------------------------------------------------------------------------------------------ train feedback
def test_train_prints_the_loss_every_logging_steps_and_log_level_reaches_the_package(tmp_path, capfd):
    """Without any logging option the loss is printed every 10 steps; `--log-level info` shows the package's own
    messages (through transformers' handler)."""
    import logging

    import torch
    from conftest import tiny_config_kwargs
    from synthetic_retrieval import all_texts, make_task
    from transformers.utils import logging as hf_logging

    from vl_joint_encoder import JointEncoderConfig, JointEncoderModel
    from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer

    queries, kb, _ = make_task(n_entities=4)
    queries = [{k: v for k, v in q.items() if k != "image"} for q in queries]
    kb = [{k: v for k, v in p.items() if k != "image"} for p in kb]
    tokenizer = train_vl_t5_tokenizer(all_texts(queries, kb), vocab_size=80)
    torch.manual_seed(0)
    JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer)))).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    argv = ["train", "--model-name-or-path", str(tmp_path / "m"), "--train-queries", write_jsonl(tmp_path / "q.jsonl", queries),
            "--kb", write_jsonl(tmp_path / "kb.jsonl", kb), "--output-dir", str(tmp_path / "out"), "--use-cpu",
            "--max-steps", "20", "--per-device-train-batch-size", "4", "--save-strategy", "no", "--report-to", "none",
            "--log-level", "info"]  # fmt: skip

    class Records(logging.Handler):  # on transformers' library logger: what its handler would print
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append((record.name, record.getMessage()))

    records = Records()
    hf_logging.get_logger().addHandler(records)
    try:
        assert cli.main(argv) == 0
    finally:
        for name in ("transformers", "vl_joint_encoder"):
            logging.getLogger(name).removeHandler(records)
        hf_logging.set_verbosity_warning()
    printed = capfd.readouterr().out
    losses = re.findall(r"'loss': '?([0-9.]+)", printed)
    assert len(losses) == 2, printed[-3000:]  # steps 10 and 20
    # the package's logger.info goes through transformers' handler at log_level info
    assert ("vl_joint_encoder.commands.train", "process 0 of 1, device cpu") in records.messages
    assert "# out" in (tmp_path / "out" / "README.md").read_text()
