"""
The configurations of the data-parallel matrix test (tests/test_trainer_distributed.py), and the script that trains
them. Each configuration runs `JointEncoderTrainer.train()` for a few steps on the synthetic task and records the
trainable parameters after every optimizer step.

Run with 2 processes (rank 0 writes OUTPUT_DIR/<name>.safetensors, rank 1 checks nothing by itself):

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/scripts/trainer_matrix.py TOKENIZER_DIR OUTPUT_DIR [NAME ...]

The test runs the same configurations in one process with twice the per-device batch (the concatenated batch) and
compares. 10 queries in batches of 3 per process: a global step takes 3 + 3 queries, the epoch's last one 3 + 1
(gradient accumulation: one optimizer step over 2 micro-batches, 3 + 3 then 3 + 1).
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time

import torch


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

NUM_QUERIES = 10
PER_DEVICE = 3  # per process with 2 processes; the one-process reference takes 2 x this
FEAT_DIM = 16


def configurations() -> dict[str, dict]:
    """name -> options: every step kind x towers x batch kind (passages text / image / some with an image, queries
    with or without an image), and each freezing option with both towers (plain and GradCache steps alternately)."""
    batch_kinds = (("text", "image"), ("image", "image"), ("text", "text"), ("mixed", "image"))
    configs = {}
    for towers, step, (passages, queries) in itertools.product(
        ("shared", "separate"), ("plain", "grad_cache", "accumulation"), batch_kinds
    ):
        configs[f"{towers}-{step}-p_{passages}-q_{queries}"] = dict(
            towers=towers, step=step, passages=passages, queries=queries, freeze="none"
        )
    for index, (towers, freeze) in enumerate(
        itertools.product(("shared", "separate"), ("clip_tower", "first_block", "adapters", "projection"))
    ):
        step = ("plain", "grad_cache")[index % 2]
        configs[f"{towers}-{step}-p_text-q_image-freeze_{freeze}"] = dict(
            towers=towers, step=step, passages="text", queries="image", freeze=freeze
        )
    # AdamW with weight decay: a parameter no process used must keep grad None (skipped by the optimizer, as in one
    # process), not get a zero gradient (which weight decay would move)
    for towers, queries in (("shared", "text"), ("separate", "image")):
        configs[f"{towers}-plain-p_text-q_{queries}-adamw"] = dict(
            towers=towers, step="plain", passages="text", queries=queries, freeze="none", optim="adamw_torch"
        )
    # LoRA (PEFT, shared tower only): the adapters and the trained visual projection, plain and GradCache steps
    for step, passages in (("plain", "text"), ("grad_cache", "image")):
        configs[f"shared-{step}-p_{passages}-q_image-lora"] = dict(
            towers="shared", step=step, passages=passages, queries="image", freeze="none", lora_r=2
        )
    return configs


def task(passages: str):
    from synthetic_retrieval import make_task

    queries, kb, store = make_task(n_entities=3, feat_dim=FEAT_DIM)
    if passages == "mixed":  # some passages with an image, some without: a rank's batch may have none at all
        kb = [dict(row, image=None) if index % 3 else row for index, row in enumerate(kb)]
    return queries[:NUM_QUERIES], kb, store


def build_model(config: dict, vocab_size: int):
    from conftest import tiny_config_kwargs

    from vl_joint_encoder import JointEncoderConfig, JointEncoderModel
    from vl_joint_encoder.vision import tiny_clip_vision_config

    extra = {}
    if config["freeze"] == "clip_tower":
        extra["vision_config"] = tiny_clip_vision_config(hidden_size=FEAT_DIM)
    if config["freeze"] == "adapters":
        extra["adapter_reduction_factor"] = 4
    if config["freeze"] in ("projection", "adapters"):
        extra["projection_dim"] = 8
    torch.manual_seed(0)
    model = JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs(vocab_size=vocab_size, **extra)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every parameter random (norms and biases too), so no path is an identity
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


class RecordParameters:
    """Trainer callback: the trainable parameters after every optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        recorder = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                recorder.steps.append(
                    {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
                )

        self.steps: list[dict[str, torch.Tensor]] = []
        self.callback = Callback()


def train(config: dict, tokenizer, output_dir: str, per_device: int) -> list[dict[str, torch.Tensor]]:
    """Train `config`; the parameters after each optimizer step."""
    from vl_joint_encoder.training.arguments import JointEncoderTrainingArguments
    from vl_joint_encoder.training.trainer import JointEncoderTrainer

    queries, kb, store = task(config["passages"])
    accumulation = config["step"] == "accumulation"
    args = JointEncoderTrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=per_device, use_cpu=True, report_to=[],
        save_strategy="no", disable_tqdm=True, logging_steps=1, n_hard_negatives=1, seed=0,
        optim=config.get("optim", "sgd"), learning_rate=0.5 if config.get("optim", "sgd") == "sgd" else 1e-3,
        weight_decay=0.0 if config.get("optim", "sgd") == "sgd" else 0.1, max_steps=1 if accumulation else 2, gradient_accumulation_steps=2 if accumulation else 1,
        grad_cache=config["step"] == "grad_cache", grad_cache_chunk_size=4,
        separate_towers=config["towers"] == "separate", use_query_images=config["queries"] == "image",
        use_passage_images=config["passages"] != "text",
        freeze_first_n_blocks=1 if config["freeze"] == "first_block" else 0,
        train_only={"adapters": "adapters", "projection": "projection"}.get(config["freeze"]),
        accelerator_config={"even_batches": False}, dataloader_num_workers=0, log_level="warning",
        lora_r=config.get("lora_r"),
    )  # fmt: skip
    recorder = RecordParameters()
    trainer = JointEncoderTrainer(
        model=build_model(config, len(tokenizer)), args=args, train_dataset=queries, kb=kb,
        processing_class=tokenizer, feature_store=store, callbacks=[recorder.callback],
    )  # fmt: skip
    trainer.train()
    return recorder.steps


def refused_setups(tokenizer, output_dir: str) -> dict[str, str]:
    """What a user gets for FSDP and DeepSpeed under 2 processes: the error raised before the first step."""
    from vl_joint_encoder.training.arguments import JointEncoderTrainingArguments
    from vl_joint_encoder.training.trainer import JointEncoderTrainer

    queries, kb, store = task("text")
    errors = {}
    setups = {
        "fsdp": dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2}),
        "deepspeed": dict(deepspeed={"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}),
    }
    for name, extra in setups.items():
        try:
            args = JointEncoderTrainingArguments(
                output_dir=os.path.join(output_dir, "runs", name), per_device_train_batch_size=PER_DEVICE, use_cpu=True,
                report_to=[], max_steps=1, **extra,
            )  # fmt: skip
            JointEncoderTrainer(model=build_model(dict(freeze="none"), len(tokenizer)), args=args, train_dataset=queries,
                                kb=kb, processing_class=tokenizer, feature_store=store).train()  # fmt: skip
            errors[name] = "accepted"
        except Exception as error:  # noqa: BLE001 - the test checks which error a user gets
            errors[name] = f"{type(error).__name__}: {error}"
    return errors


def flatten(steps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        f"step{index}/{name}": value.contiguous() for index, step in enumerate(steps) for name, value in step.items()
    }


class WarningCapture(logging.Handler):
    """Every log record and Python warning, to check that no DDP unused-parameter warning is emitted."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main(tokenizer_dir: str, output_dir: str, names: list[str]) -> None:
    import warnings

    from accelerate import PartialState
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    if state.num_processes != 2:
        raise SystemExit(f"expected 2 processes, got {state.num_processes}: launch with --multi_gpu and the CPU")
    capture = WarningCapture()
    logging.getLogger().addHandler(capture)
    logging.captureWarnings(True)
    warnings.simplefilter("always")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    configs = configurations()
    timings = {}
    for name in names or list(configs):
        start = time.perf_counter()
        steps = train(configs[name], tokenizer, os.path.join(output_dir, "runs", name), PER_DEVICE)
        timings[name] = time.perf_counter() - start
        if state.is_main_process:
            save_file(flatten(steps), os.path.join(output_dir, f"{name}.safetensors"))
    refusals = refused_setups(tokenizer, output_dir)
    if state.is_main_process:
        import json

        with open(os.path.join(output_dir, "timings.json"), "w") as handle:
            json.dump(timings, handle)
        with open(os.path.join(output_dir, "refusals.json"), "w") as handle:
            json.dump(refusals, handle)
    with open(os.path.join(output_dir, f"log_rank{state.process_index}.txt"), "w") as handle:
        handle.write("\n".join(capture.messages))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
