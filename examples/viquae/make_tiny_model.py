"""Build the recipe's `--small` starting model offline, as `vl-joint-encoder demo` does: a VL-T5-layout tokenizer
trained on the prepared questions and passages, tiny T5 blocks and a tiny frozen random CLIP tower
(`vl_joint_encoder.demo.tiny_model`). It learns from the data alone: numbers from it test the pipeline, not ViQuAE.

    python examples/viquae/make_tiny_model.py --questions OUT/data/questions --passages P --output OUT/tiny-model
"""

import argparse
import itertools

from vl_joint_encoder.demo.tiny_model import TinyModelSize, build_tiny_model
from vl_joint_encoder.viquae.loading import load_passages, load_questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", required=True)
    parser.add_argument("--passages", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--max-texts", type=int, default=20000, help="passages the tokenizer is trained on")
    args = parser.parse_args()
    questions = load_questions(args.questions)
    passages = load_passages(args.passages)
    texts = itertools.chain(
        (text for table in questions.values() for text in table["input"]),
        passages.select(range(min(len(passages), args.max_texts)))["passage"],
    )
    model, processor = build_tiny_model(texts, TinyModelSize(vocab_size=args.vocab_size), seed=0)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    print(f"tiny model ({sum(p.numel() for p in model.parameters())} parameters) -> {args.output}")


if __name__ == "__main__":
    main()
