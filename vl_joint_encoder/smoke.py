"""`vl-joint-encoder smoke`: build a tiny random joint encoder, embed text + visual tokens, save and reload it."""

from __future__ import annotations

import argparse
import tempfile

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vl-joint-encoder smoke", description=__doc__)
    parser.add_argument("--output-dir", default=None, help="where to save the tiny model (default: a temp dir)")
    args = parser.parse_args(argv)

    from transformers import AutoModel

    from . import JointEncoderConfig, JointEncoderModel

    torch.manual_seed(0)
    config = JointEncoderConfig(vocab_size=300, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, feat_dim=32)
    model = JointEncoderModel(config).eval()
    input_ids = torch.randint(2, 200, (2, 12))
    visual_feats, visual_pos = torch.randn(2, 36, 32), torch.rand(2, 36, 4).sort(-1).values
    with torch.no_grad():
        output = model(input_ids=input_ids, visual_feats=visual_feats, visual_pos=visual_pos)
    print(f"last_hidden_state {tuple(output.last_hidden_state.shape)}  pooler_output {tuple(output.pooler_output.shape)}")
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="vl-joint-encoder-smoke-")
    model.save_pretrained(output_dir)
    reloaded = AutoModel.from_pretrained(output_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        again = reloaded(input_ids=input_ids, visual_feats=visual_feats, visual_pos=visual_pos).pooler_output
    print(f"saved to {output_dir}; reloaded with AutoModel: max |diff| = {(again - output.pooler_output).abs().max():.2e}")
    return 0
