"""Throughput of JointEncoderModel against transformers' own encoder on the same weights: T5EncoderModel for
`--backbone t5`, BartModel's encoder for `--backbone bart`.

Baseline: the transformers model with the same weights, same attention implementation, same dtype, same total
sequence length, measured in the same run with interleaved repetitions (A, B, A, B, ...) so that machine noise hits
both.
Cases:
  - text-only: batch x length tokens for both models;
  - text + 36 visual tokens: ours gets (length - 36) text tokens + 36 visual tokens, the baseline gets `length` text
    tokens;
  - each also "padded": text lengths vary per row (the realistic retrieval batch), same masks for both models.
Ratio = baseline time / our time (>= 1 means we are faster; target >= 0.95).

    python benchmarks/bench_encoder.py                       # t5-small shape, fp32, CPU
    python benchmarks/bench_encoder.py --size base --device cuda --dtype bfloat16
    python benchmarks/bench_encoder.py --backbone bart --size base   # bart-base shape
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from transformers import BartConfig, BartModel, T5Config, T5EncoderModel

from vl_joint_encoder import JointEncoderConfig, JointEncoderModel


SIZES = {
    "tiny": dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4),
    "small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
}
BART_SIZES = {  # "base" = facebook/bart-base's encoder (6 layers)
    "tiny": dict(d_model=128, d_ff=512, num_layers=2, num_heads=4),
    "small": dict(d_model=512, d_ff=2048, num_layers=6, num_heads=8),
    "base": dict(d_model=768, d_ff=3072, num_layers=6, num_heads=12),
}
BART_VOCAB = 50465  # bart-base + the 200 VL-BART tokens


class _BartEncoderOnly(torch.nn.Module):
    """BartModel's encoder called as T5EncoderModel is, so both baselines run through the same timing code."""

    def __init__(self, bart: BartModel):
        super().__init__()
        self.encoder = bart.encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask)


def build_bart_pair(size: str, attn: str, dtype: torch.dtype, device: str):
    dims = BART_SIZES[size]
    bart = BartModel(BartConfig(
        vocab_size=BART_VOCAB, d_model=dims["d_model"], encoder_layers=dims["num_layers"], decoder_layers=1,
        encoder_attention_heads=dims["num_heads"], decoder_attention_heads=dims["num_heads"],
        encoder_ffn_dim=dims["d_ff"], decoder_ffn_dim=dims["d_ff"], dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, attn_implementation=attn,
    ))
    ours = JointEncoderModel(JointEncoderConfig(backbone="bart", vocab_size=BART_VOCAB, dropout_rate=0.0,
                                                feat_dim=2048, attn_implementation=attn, **dims))
    state = {k[len("encoder."):]: v for k, v in bart.state_dict().items() if k.startswith("encoder.")}
    state["shared.weight"] = state.pop("embed_tokens.weight", bart.shared.weight)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("visual_embedding.") for k in missing), (missing, unexpected)
    return _BartEncoderOnly(bart).to(device, dtype).eval(), ours.to(device, dtype).eval()


def build_pair(size: str, attn: str, dtype: torch.dtype, device: str):
    dims = SIZES[size]
    t5 = T5EncoderModel(T5Config(vocab_size=32200, dropout_rate=0.0, attn_implementation=attn, **dims))
    ours = JointEncoderModel(
        JointEncoderConfig(vocab_size=32200, dropout_rate=0.0, feat_dim=2048, attn_implementation=attn, **dims)
    )
    state = {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in t5.state_dict().items()}
    state.pop("embed_tokens.weight", None)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("visual_embedding.") for k in missing), (missing, unexpected)
    return t5.to(device, dtype).eval(), ours.to(device, dtype).eval()


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.inference_mode()
def compare(t5, ours, batch: int, length: int, visual: int, device: str, dtype: torch.dtype, repeats: int,
            padded: bool = False):
    generator = torch.Generator().manual_seed(0)
    pad = ours.config.pad_token_id
    ids_t5 = torch.randint(2, 32000, (batch, length), generator=generator).to(device)
    mask_t5 = torch.ones_like(ids_t5)
    if padded:  # realistic retrieval batches: text lengths vary, the tail of each row is padding
        lengths = torch.randint((length - visual) // 2, length - visual + 1, (batch,), generator=generator)
        mask_t5 = (torch.arange(length)[None, :] < lengths[:, None]).long().to(device)
        ids_t5 = ids_t5 * mask_t5 + pad * (1 - mask_t5)
    text_len = length - visual
    ids_ours = ids_t5[:, :text_len]
    extra = {}
    if visual:
        extra = dict(
            visual_feats=torch.randn(batch, visual, 2048, generator=generator).to(device, dtype),
            visual_pos=torch.rand(batch, visual, 4, generator=generator).to(device, dtype),
        )

    def run_t5():
        t5(input_ids=ids_t5, attention_mask=mask_t5)

    def run_ours():
        ours(input_ids=ids_ours, attention_mask=mask_t5[:, :text_len], **extra)

    for _ in range(2):  # warm-up
        run_t5()
        run_ours()
    t5_times, our_times = [], []
    for _ in range(repeats):
        t5_times.append(timed(run_t5, device))
        our_times.append(timed(run_ours, device))
    t5_median, our_median = statistics.median(t5_times), statistics.median(our_times)
    return t5_median, our_median


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=["t5", "bart"], default="t5",
                        help="t5: against T5EncoderModel; bart: against BartModel's encoder")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--visual", type=int, default=36)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--attn", nargs="+", default=["eager", "sdpa"])
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(
        f"# bench_encoder: backbone={args.backbone} size={args.size} dtype={args.dtype} device={args.device} "
        f"({device_name}), "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch} x length {args.length}"
    )
    baseline = "BartModel encoder" if args.backbone == "bart" else "T5EncoderModel"
    print(f"| attention | case | {baseline} (ms) | JointEncoderModel (ms) | ratio {baseline.split()[0]}/ours |")
    print("|---|---|---|---|---|")
    for attn in args.attn:
        t5, ours = (build_bart_pair if args.backbone == "bart" else build_pair)(args.size, attn, dtype, args.device)
        cases = (
            ("text only", 0, False),
            ("text only, padded", 0, True),
            (f"text + {args.visual} visual", args.visual, False),
            (f"text + {args.visual} visual, padded", args.visual, True),
        )
        for case, visual, padded in cases:
            t5_time, our_time = compare(
                t5, ours, args.batch, args.length, visual, args.device, dtype, args.repeats, padded
            )
            print(f"| {attn} | {case} | {t5_time * 1e3:.1f} | {our_time * 1e3:.1f} | {t5_time / our_time:.3f} |")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
