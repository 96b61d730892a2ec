"""Issue 14, conversion: a `--source` the keys contradict is refused, fp16 / bf16 checkpoints self-check, non-float
weights and text files named `.pth` are clear errors, and a kill at a random point of a conversion leaves nothing that
a rerun does not clean: the rerun gives the uninterrupted result, byte for byte."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from test_conversion import leftovers, original_checkpoint

from conversion.convert_vl_t5_checkpoint import convert, main
from conversion.key_map import ConversionError
from vl_joint_encoder import JointEncoderModel


TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    torch.save(original_checkpoint(seed=8)[0], root / "vlt5.pth")
    torch.save(original_checkpoint(seed=8, tasks=("vqa",))[0], root / "vladapter.pth")
    return root


def test_vl_adapter_source_on_a_vl_t5_checkpoint_is_refused(checkpoints, tmp_path):
    # the issue: it converted silently with VL-Adapter's 6x6 downsampling
    with pytest.raises(ConversionError, match="--source vl-adapter but the checkpoint has no adapter keys.*vl-t5"):
        convert(checkpoints / "vlt5.pth", tmp_path / "out", source="vl-adapter")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    # an explicit --downsample says it is a VL-Adapter full fine-tuning checkpoint (no adapters)
    result = convert(checkpoints / "vlt5.pth", tmp_path / "full", source="vl-adapter", downsample=True)
    assert result.config.visual_downsample_size == 6
    assert convert(checkpoints / "vlt5.pth", tmp_path / "t5").config.visual_downsample_size is None  # detected


def test_vl_t5_source_on_a_vl_adapter_checkpoint_is_refused(checkpoints, tmp_path):
    with pytest.raises(
        ConversionError, match=r"--source vl-t5 but the checkpoint holds VL-Adapter modules.*\['vqa'\]"
    ):
        convert(checkpoints / "vladapter.pth", tmp_path / "out", source="vl-t5")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_convert_to_the_upcast_weights(tmp_path, dtype):
    # the issue: the self-check failed with "expected m1 and m2 to have the same dtype"
    state = {k: v.to(dtype) for k, v in original_checkpoint(seed=8)[0].items()}
    torch.save(state, tmp_path / "half.pth")
    result = convert(tmp_path / "half.pth", tmp_path / "out")
    assert all(check.max_abs_diff <= check.tolerance for check in result.self_checks)
    model = JointEncoderModel.from_pretrained(tmp_path / "out")
    q = state["module.encoder.block.0.layer.0.SelfAttention.q.weight"]
    assert torch.equal(model.block[0].layer[0].SelfAttention.q.weight, q.float())  # exact: an upcast is lossless


def test_integer_weights_are_refused_by_name(tmp_path):
    state = dict(original_checkpoint(seed=8)[0])
    key = "module.encoder.block.0.layer.0.SelfAttention.q.weight"
    state[key] = (state[key] * 10).long()
    torch.save(state, tmp_path / "int.pth")
    with pytest.raises(
        ConversionError, match=r"1 weight\(s\) are not floating point.*SelfAttention.q.weight: torch.int64"
    ):
        convert(tmp_path / "int.pth", tmp_path / "out")


def test_a_text_file_named_pth(tmp_path, capsys):
    (tmp_path / "model.pth").write_text("hello\n")
    assert main(["--checkpoint", str(tmp_path / "model.pth"), "--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "model.pth is not a PyTorch checkpoint" in err and "Traceback" not in err


def test_stale_temporaries_of_a_dead_process_are_removed(checkpoints, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abcd1234"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    alive = tmp_path / f".out.tmp-{os.getppid()}-abcd1234"  # a live process's temporary is left alone
    alive.mkdir()
    convert(checkpoints / "vlt5.pth", tmp_path / "out")
    assert not stale.exists() and alive.exists()


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from conversion.convert_vl_t5_checkpoint import convert

    kill_at, count = int(sys.argv[3]), 0
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def hook(event, args):  # every file-system change of the conversion is a point where the kill may land
        global count
        if event == "open":
            mode, flags = args[1], args[2]
            if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE)):
                return
        elif event not in ("os.rename", "os.replace", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
            return
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    convert(sys.argv[1], sys.argv[2], overwrite=True)
    print("changes", count)
    """
)


def files_of(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.mark.slow  # four fresh processes (each imports torch and transformers): ~30 s on a loaded 2-core machine
def test_a_kill_at_random_points_of_a_conversion_then_a_rerun_gives_the_uninterrupted_result(checkpoints, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=TESTS))
    env = {**os.environ, "TQDM_DISABLE": "1"}

    def child(output, kill_at):
        return subprocess.run([sys.executable, str(script), str(checkpoints / "vlt5.pth"), str(output), str(kill_at)],
                              capture_output=True, text=True, env=env, timeout=300)  # fmt: skip

    (tmp_path / "reference").mkdir()
    reference = child(tmp_path / "reference" / "model", 0)  # same folder name: the card's title is the folder's
    assert reference.returncode == 0, reference.stderr[-2000:]
    changes = int(reference.stdout.split("changes")[-1])
    expected = files_of(tmp_path / "reference" / "model")
    assert changes >= 5 and "model.safetensors" in expected
    rng = np.random.default_rng(14)
    points = sorted({int(p) for p in rng.integers(1, changes + 1, size=3)})
    for point in points:
        work = tmp_path / f"kill-{point}"
        work.mkdir()
        killed = child(work / "model", point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stdout, killed.stderr[-2000:])
        convert(checkpoints / "vlt5.pth", work / "model", overwrite=True)  # the rerun
        assert files_of(work / "model") == expected, point  # weights, config, code and card, byte for byte
        assert not leftovers(work), (point, os.listdir(work))
