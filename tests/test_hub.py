"""End to end: the conversion CLI pushes to a local Hub server for real, then a process that cannot import
vl_joint_encoder loads the model (remote code) and the tokenizer back from that server by repo id, and the
local output directory too."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import hub_server  # noqa: F401  (pytest fixture)
from reference_vl_t5 import reference_encoder
from safetensors.torch import load_file
from test_conversion import inputs, original_checkpoint

from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer


ROOT = Path(__file__).resolve().parent.parent
REPO_ID = "vl-joint-encoder-tests/tiny-vlt5-encoder"


@pytest.mark.slow  # two fresh Python processes (convert + push, then pull): ~30 s on 2 shared cores
def test_cli_pushes_to_the_hub_and_the_model_loads_back(tmp_path, hub_server):  # noqa: F811
    texts = ["who designed this bridge", "a photo of the golden gate bridge at dusk", "which river flows here"] * 10
    base = train_vl_t5_tokenizer(texts, vocab_size=60, n_vis=0)  # a T5 tokenizer without the <vis_extra_id_*>
    base.save_pretrained(tmp_path / "t5-tokenizer")
    vocab_size = len(base) + 100
    state, encoder_state, _ = original_checkpoint(seed=11, vocab_size=vocab_size)
    torch.save(state, tmp_path / "Epoch30.pth")

    env = hub_server.env(tmp_path / "hf_home")
    command = [
        sys.executable, str(ROOT / "conversion" / "convert_vl_t5_checkpoint.py"),
        "--checkpoint", str(tmp_path / "Epoch30.pth"), "--output-dir", str(tmp_path / "out"),
        "--tokenizer", str(tmp_path / "t5-tokenizer"), "--relative-attention-max-distance", "20",
        "--push-to-hub", REPO_ID, "--commit-message", "Add the converted tiny encoder",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "source: vl-t5 (detected from the keys)" in run.stdout
    assert f"pushed: {hub_server.url}/{REPO_ID}" in run.stdout

    # one commit holding model, code, tokenizer and card; the weights went through LFS
    repo = hub_server.repos[REPO_ID]
    assert [c["summary"] for c in repo.commits] == ["Add the converted tiny encoder"]
    local = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert sorted(repo.files) == local
    assert {"README.md", "config.json", "model.safetensors", "modeling_joint_encoder.py",
            "configuration_joint_encoder.py", "tokenizer.json", "tokenizer_config.json"} <= set(local)  # fmt: skip
    assert "model.safetensors" in repo.lfs
    for name in local:
        assert repo.files[name] == (tmp_path / "out" / name).read_bytes(), name
    assert f"/{REPO_ID}.git/info/lfs/objects/batch" in [path for _, path in hub_server.requests]

    batch = inputs(type("C", (), {"vocab_size": vocab_size, "feat_dim": 16})())
    torch.save(batch, tmp_path / "batch.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path = [p for p in sys.path if p not in ("", {str(ROOT)!r})]
        sys.modules["vl_joint_encoder"] = None  # any import of the package now fails
        try:
            import vl_joint_encoder
            raise SystemExit("the package is importable: the test would prove nothing")
        except ImportError:
            pass
        import torch
        from transformers import AutoModel, AutoTokenizer
        model = AutoModel.from_pretrained({REPO_ID!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        tokenizer = AutoTokenizer.from_pretrained({REPO_ID!r})
        batch = torch.load({str(tmp_path / "batch.pt")!r}, weights_only=True)
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        local = AutoModel.from_pretrained({str(tmp_path / "out")!r}, trust_remote_code=True).eval()
        assert type(local).__module__.startswith("transformers_modules"), type(local).__module__
        with torch.no_grad():
            assert torch.equal(local(**batch).last_hidden_state, hidden)
        torch.save({{"state": model.state_dict(), "hidden": hidden}}, {str(tmp_path / "pulled.pt")!r})
        print("VIS0", tokenizer.convert_tokens_to_ids("<vis_extra_id_0>"), "LEN", len(tokenizer))
        """
    )
    pull = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)  # fmt: skip
    assert pull.returncode == 0, pull.stderr[-3000:]
    assert f"VIS0 {vocab_size - 1} LEN {vocab_size}" in pull.stdout
    pulled = torch.load(tmp_path / "pulled.pt", weights_only=True)

    # the weights that came back are the local ones, which are the source's encoder weights under our names
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(pulled["state"]) == sorted(saved)
    for key, value in saved.items():
        assert torch.equal(pulled["state"][key], value), key
        assert torch.equal(value, encoder_state["shared.weight" if key == "shared.weight" else "encoder." + key]), key
    expected = reference_encoder(encoder_state, num_heads=4, num_buckets=8, max_distance=20, **batch)
    torch.testing.assert_close(pulled["hidden"], expected, atol=1e-5, rtol=0)
    config = json.loads(repo.files["config.json"])
    assert config["auto_map"]["AutoModel"] == "modeling_joint_encoder.JointEncoderModel"
