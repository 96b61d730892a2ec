"""`vl-joint-encoder demo`: train and evaluate a multimodal (image + question) retriever end to end on a generated
toy world, in a few minutes on a CPU (see `vl_joint_encoder.demo`)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from . import command_main


RESULTS = "results.json"  # = demo.run.RESULTS: the file that marks a finished demo run


@dataclass
class DemoArguments:
    output_dir: str = field(default="vl-joint-encoder-demo", metadata={"help": "where everything is written"})
    overwrite: bool = field(default=False, metadata={"help": "replace a previous demo run in --output-dir"})
    seed: int = field(default=0, metadata={"help": "seed of the world, the model and the training"})
    num_entities: int = field(default=48, metadata={"help": "entities seen in training"})
    num_unseen_entities: int = field(default=16, metadata={"help": "entities held out of training"})
    num_attributes: int = field(default=8, metadata={"help": "passages (facts) per entity, 2 to 8"})
    train_renderings: int = field(
        default=6, metadata={"help": "training questions (each with its own rendering) per entity and attribute"}
    )
    image_size: int = field(default=32, metadata={"help": "image side in pixels (multiple of 8)"})
    max_steps: int = field(default=500, metadata={"help": "training steps"})
    batch_size: int = field(default=32, metadata={"help": "queries per training batch"})
    hard_negatives: int = field(
        default=1, metadata={"help": "hard negatives per query: the same fact of another entity (0: in-batch only)"}
    )
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW peak rate (linear warm-up and decay)"})
    eval_steps: int = field(default=100, metadata={"help": "validation MRR@10 every N steps"})
    lora_r: int = field(
        default=0, metadata={"help": "train LoRA adapters of this rank (PEFT) instead of the whole encoder; 0: full"}
    )
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "with --lora-r: layers LoRA wraps (as vl-joint-encoder train's option)"}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "with --lora-r: modules trained fully (as vl-joint-encoder train's option)"}
    )
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or auto (cuda when available)"})
    num_threads: int = field(
        default=1, metadata={"help": "torch CPU threads (1 is fastest for a model this small, and on a busy machine)"}
    )
    no_plots: bool = field(default=False, metadata={"help": "skip the PNG figures (no matplotlib needed)"})

    def __post_init__(self):
        if self.lora_r < 0:
            raise ValueError(f"--lora-r must be >= 0 (0: full fine-tuning), got {self.lora_r}")
        for name in ("num_entities", "train_renderings", "max_steps", "batch_size", "eval_steps", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_entities < 2:
            raise ValueError(
                f"--num-entities must be >= 2 (retrieval needs something to tell apart), got {self.num_entities}"
            )
        if self.num_unseen_entities < 0 or self.hard_negatives < 0:
            raise ValueError("--num-unseen-entities and --hard-negatives must be >= 0")
        from ..demo.toy_world import ATTRIBUTES, MAX_ENTITIES

        if self.num_entities + self.num_unseen_entities > MAX_ENTITIES:
            raise ValueError(
                f"--num-entities + --num-unseen-entities = {self.num_entities + self.num_unseen_entities}, but at "
                f"most {MAX_ENTITIES} entities have distinct looks (colour sets): lower them"
            )
        if not 2 <= self.num_attributes <= len(ATTRIBUTES):
            raise ValueError(f"--num-attributes must be in [2, {len(ATTRIBUTES)}], got {self.num_attributes}")
        if self.image_size < 16 or self.image_size % 8:
            raise ValueError(f"--image-size must be a multiple of 8 and >= 16 (8-pixel patches), got {self.image_size}")
        if self.batch_size > self.num_entities * self.num_attributes * self.train_renderings:
            raise ValueError(f"--batch-size {self.batch_size} is larger than the training set: lower it")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"--device must be cpu, cuda or auto, got {self.device!r}")
        if os.path.exists(os.path.join(self.output_dir, RESULTS)) and not self.overwrite:
            raise ValueError(
                f"{self.output_dir} already holds a demo run ({RESULTS}): pass --overwrite, or another --output-dir"
            )
        if os.path.isfile(self.output_dir):
            raise ValueError(f"--output-dir {self.output_dir} is a file, not a folder")


def demo(args: DemoArguments) -> int:
    import torch

    from ..demo.run import format_results_table, next_steps, run_demo

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.num_threads)
    try:
        results = run_demo(args)
    finally:
        torch.set_num_threads(previous_threads)
    print()
    print(format_results_table(results["table"]))
    print(f"chance level of the text-only ablation (the asked fact of a random entity): MRR@10 = "
          f"{results['chance_mrr@10_text_only']:.3f}")
    timings = results["timings"]
    print(f"measured on {results['machine']} (seed {args.seed}): the same machine and seed give the same numbers; "
          f"another machine may differ by up to ~0.02 (floating-point sums in another order)")
    print(f"time: {timings['total_s']:.0f} s in all (training {timings['train_s']:.0f} s)")
    print(f"\noutputs in {args.output_dir}/: model/ (AutoModel + AutoProcessor, README.md model card), embeddings/ "
          f"(the KB encoded), runs/, data/ (the package's data format), {RESULTS}"
          + ("" if args.no_plots else ", training.png, queries.png"))
    print("\nnext steps, reusing these outputs:")
    for line in next_steps(args.output_dir):
        print(f"  {line}")
    return 0


main = command_main(
    "vl-joint-encoder demo",
    [DemoArguments],
    demo,
    "Train and evaluate a multimodal (image + question) retriever end to end on a generated toy world, in a few "
    "minutes on a CPU. Prints an untrained / trained / text-only / unseen-entities table.",
)

if __name__ == "__main__":
    sys.exit(main())
