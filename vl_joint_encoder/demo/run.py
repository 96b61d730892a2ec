"""`vl-joint-encoder demo`: train and evaluate a multimodal retriever end to end on a generated "toy world".

1. Generate the toy world (`toy_world.py`): entities with a look and facts, a multimodal KB (passage text + the
   entity's canonical image), questions that never name the entity, each with a fresh rendering of it.
2. Train a tokenizer on it, build a small joint encoder with a tiny frozen CLIP tower (`tiny_model.py`).
3. Search the test split with the untrained model; train with `JointEncoderTrainer` and `InBatchContrastiveLoss`
   (validation MRR@10 along the way); search again: with images, without any image (text-only ablation), and on
   the entities never seen in training. Encoding, search and metrics are the package's (`encode`, `search`,
   `ir_metrics`), as on real data.
4. Write the model (AutoModel / AutoProcessor), the KB embeddings, the runs, the results and two figures.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.utils import logging

from ..utils.io import atomic_path, write_json


logger = logging.get_logger(__name__)

RESULTS = "results.json"
METRICS = ("mrr@10", "recall@1", "recall@10")


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device: use --device cpu")
    return name


def training_rows(world, hard_negatives: bool) -> list[dict]:
    """Training queries; hard negatives = the passages stating the same fact about the other training entities
    (they share every word of the question's attribute, like BM25 negatives in ViQuAE)."""
    if not hard_negatives:
        return [{k: row[k] for k in ("id", "question", "image", "positive_ids")} for row in world.splits["train"]]
    seen = [entity.entity_id for entity in world.entities]
    return [
        {
            "id": row["id"], "question": row["question"], "image": row["image"], "positive_ids": row["positive_ids"],
            "negative_ids": [f"{other}-{row['attribute']}" for other in seen if other != row["entity"]],
        }
        for row in world.splits["train"]
    ]


def machine_description(device: str, num_threads: int) -> str:
    """What the numbers were measured on: the CPU (or GPU) model, threads, torch version."""
    import platform

    import torch

    if device.startswith("cuda"):
        where = torch.cuda.get_device_name(0)
    else:
        where = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as handle:
                names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
            if names:
                where = names[0]
        except OSError:
            pass
        where = f"{where}, {os.cpu_count()} cores, {num_threads} torch thread(s)"
    return f"{where}; torch {torch.__version__}, {platform.system()}"


def next_steps(out: str) -> list[str]:
    """The commands that reuse the demo's outputs (printed at the end of the run, and shown in the README)."""
    data = os.path.join(out, "data")
    return [
        f"vl-joint-encoder search --model {out}/model --queries {data}/test.jsonl --image-root {data} "
        f"--embeddings {out}/embeddings --output run.json --k 10",
        f"vl-joint-encoder evaluate --run run.json --qrels {data}/qrels.test.json --metrics mrr@10 recall@1",
        f"vl-joint-encoder data-report --model {out}/model --queries {data}/train.jsonl --kb {data}/kb.jsonl "
        f"--image-root {data}",
        f"vl-joint-encoder train --model-name-or-path {out}/model --train-queries {data}/train.jsonl "
        f"--kb {data}/kb.jsonl --image-root {data} --output-dir retrained --max-steps 50 --use-cpu",
        f"python: the usage snippet of {out}/model/README.md (AutoModel + AutoProcessor, one image, one question)",
    ]


def chance_mrr_at_10(n_candidates: int) -> float:
    """Expected MRR@10 when the relevant passage sits at a uniformly random rank among `n_candidates` ties."""
    return sum(1.0 / rank for rank in range(1, min(10, n_candidates) + 1)) / n_candidates


def format_results_table(rows: list[dict]) -> str:
    header = f"{'model':<28} {'split':<8} {'images':<8} {'queries':>7} {'MRR@10':>7} {'R@1':>6} {'R@10':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        metrics = row["metrics"]
        lines.append(
            f"{row['model']:<28} {row['split']:<8} {row['images']:<8} {row['queries']:>7} "
            f"{metrics['mrr@10']:>7.3f} {metrics['recall@1']:>6.3f} {metrics['recall@10']:>6.3f}"
        )
    return "\n".join(lines)


class QuietProgress(TrainerCallback):
    """One training progress bar showing the latest loss and validation MRR@10 (instead of printed log dicts)."""

    def __init__(self):
        self.bar = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc="training", unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            if "loss" in logs:
                self.postfix["loss"] = f"{logs['loss']:.3f}"
            if "eval_mrr@10" in logs:
                self.postfix["val MRR@10"] = f"{logs['eval_mrr@10']:.3f}"
            self.bar.set_postfix(self.postfix, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_demo(args) -> dict:
    """Run the demo with `args` (`commands.demo.DemoArguments`); returns what results.json holds."""
    from transformers import ProgressCallback, set_seed

    from ..retrieval.encode import encode_knowledge_base
    from ..retrieval.evaluator import RetrievalEvaluator
    from ..retrieval.metrics import evaluate
    from ..retrieval.runs import write_run
    from ..training.arguments import JointEncoderTrainingArguments
    from ..training.trainer import JointEncoderTrainer
    from .tiny_model import TinyModelSize, build_tiny_model
    from .toy_world import build_toy_world, write_toy_world

    started = time.perf_counter()
    timings: dict[str, float] = {}
    device = resolve_device(args.device)
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    if args.overwrite and os.path.exists(os.path.join(out, RESULTS)):
        os.remove(os.path.join(out, RESULTS))  # the run is "complete" only once results.json is written again

    # 1. data
    print(f"[1/4] generating the toy world (seed {args.seed}) ...", flush=True)
    world = build_toy_world(
        num_entities=args.num_entities, num_unseen_entities=args.num_unseen_entities,
        num_attributes=args.num_attributes, train_renderings=args.train_renderings, image_size=args.image_size,
        seed=args.seed, progress=True,
    )
    if args.hard_negatives > 0:  # written too: `vl-joint-encoder train` on data/train.jsonl gets the same negatives
        for row, negatives in zip(world.splits["train"], training_rows(world, hard_negatives=True)):
            row["negative_ids"] = negatives["negative_ids"]
    write_toy_world(world, os.path.join(out, "data"))
    kb, test, unseen = world.kb, world.splits["test"], world.splits["unseen"]
    print(f"      {len(world.entities)} entities (+{len(world.unseen_entities)} unseen) x {args.num_attributes} facts: "
          f"KB of {len(kb)} passages; {len(world.splits['train'])} training questions, {len(test)} test, "
          f"{len(unseen)} about unseen entities", flush=True)
    timings["data_s"] = time.perf_counter() - started

    # 2. tokenizer + model
    set_seed(args.seed)
    size = TinyModelSize(image_size=args.image_size)
    texts = [row["text"] for row in kb] + [row["question"] for row in world.splits["train"]]
    model, processor = build_tiny_model(texts, size, seed=args.seed)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"[2/4] tokenizer ({len(processor.tokenizer)} tokens) and joint encoder ({n_params / 1e3:.0f}k trainable "
          f"parameters, frozen random CLIP tower {size.image_size}px / {size.patch_size}px patches)", flush=True)

    def evaluate_row(name: str, split: str, queries, use_images: bool = True):
        """Search `queries` over the KB with the package's RetrievalEvaluator; write the run; one table row."""
        if not use_images:  # the ablation: no image anywhere, neither in the queries nor in the passages
            queries = [{k: row[k] for k in ("id", "question", "positive_ids")} for row in queries]
        passages = kb if use_images else [{k: row[k] for k in ("id", "text")} for row in kb]
        evaluator = RetrievalEvaluator(queries, passages, processor, metrics=METRICS, k=10, max_length=64)
        run = evaluator.run(model)
        os.makedirs(os.path.join(out, "runs"), exist_ok=True)
        write_run(run, os.path.join(out, "runs", f"{split}.{name}{'' if use_images else '-text-only'}.json"))
        return run, {"model": name, "split": split, "images": "yes" if use_images else "removed",
                     "queries": len(queries), "metrics": evaluate(evaluator.qrels, run, METRICS)}

    _, untrained = evaluate_row("untrained", "test", test)
    validation_evaluator = RetrievalEvaluator(world.splits["validation"], kb, processor, metrics=["mrr@10"], k=10,
                                              max_length=64)
    untrained_validation = validation_evaluator(model)["mrr@10"]
    timings["setup_s"] = time.perf_counter() - started - timings["data_s"]

    # 3. training
    print(f"[3/4] training {args.max_steps} steps (batch {args.batch_size} queries + "
          f"{args.hard_negatives} hard negative(s) each) ...", flush=True)
    training_args = JointEncoderTrainingArguments(
        output_dir=os.path.join(out, "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=max(1, args.max_steps // 20),
        weight_decay=0.01,
        n_hard_negatives=args.hard_negatives,
        query_max_length=32,
        passage_max_length=64,
        logging_steps=max(1, min(10, args.max_steps // 10)),
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        lora_r=args.lora_r or None,
        lora_target_modules=args.lora_target_modules,
        lora_modules_to_save=args.lora_modules_to_save,
    )
    trainer = JointEncoderTrainer(
        model=model,
        args=training_args,
        train_dataset=training_rows(world, args.hard_negatives > 0),
        kb=[{k: row[k] for k in ("id", "text", "image")} for row in kb],
        processing_class=processor,
        evaluator=validation_evaluator,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    from ..training.lora import log_parameters

    parameters = log_parameters(trainer.model, "demo training")  # trainable / total (frozen tower included)
    train_started = time.perf_counter()
    trainer.train()
    timings["train_s"] = time.perf_counter() - train_started

    # 4. evaluation + outputs
    print("[4/4] evaluating and writing outputs ...", flush=True)
    evaluation_started = time.perf_counter()
    trained_run, trained = evaluate_row("trained", "test", test)
    # the trained KB embeddings, as `vl-joint-encoder encode` writes them (`vl-joint-encoder search` reads them)
    embeddings_dir = os.path.join(out, "embeddings")
    shutil.rmtree(embeddings_dir, ignore_errors=True)
    encode_knowledge_base(model, processor, [{k: row[k] for k in ("id", "text", "image")} for row in kb],
                          embeddings_dir, max_length=64, progress=False)
    _, text_only = evaluate_row("trained", "test", test, use_images=False)
    rows = [untrained, trained, text_only]
    if unseen:
        rows.append(evaluate_row("trained", "unseen", unseen)[1])
    n_entities = len(world.entities) + len(world.unseen_entities)
    chance = chance_mrr_at_10(n_entities)
    timings["evaluation_s"] = time.perf_counter() - evaluation_started

    model_dir = os.path.join(out, "model")
    with atomic_path(model_dir) as staging:  # written aside, renamed into place: never a half-written model/
        if args.lora_r:  # model/ = the merged model (loads as full fine-tuning's does), model/lora_adapter/ = PEFT
            from ..training.lora import save_merged

            save_merged(trainer.model, staging, processor)
            trainer.model.save_pretrained(os.path.join(staging, "lora_adapter"))
        else:
            trainer.save_final_model(
                staging,
                results={f"test_{k}": v for k, v in trained["metrics"].items()},
                data_description=f"The vl-joint-encoder demo's toy world (seed {args.seed}): {len(world.entities)} "
                f"entities x {args.num_attributes} facts, questions with a rendering of the entity.",
                final_dir=model_dir,
            )
            processor.save_pretrained(staging)
    shutil.rmtree(os.path.join(out, "trainer"), ignore_errors=True)

    figures = {}
    if not args.no_plots:
        from .plots import plot_query_sheet, plot_training

        figures["training"] = os.path.join(out, "training.png")
        plot_training(trainer.state.log_history, figures["training"], untrained_mrr=untrained_validation)
        figures["queries"] = os.path.join(out, "queries.png")
        picked = np.random.default_rng(args.seed).choice(len(test), size=min(6, len(test)), replace=False)
        sample = [test[i] for i in sorted(picked)]
        plot_query_sheet(sample, trained_run, {row["id"]: row for row in kb}, figures["queries"])

    timings["total_s"] = time.perf_counter() - started
    results = {
        "table": rows,
        "chance_mrr@10_text_only": chance,
        "settings": {k: v for k, v in vars(args).items() if k not in ("overwrite",)},
        "device": device,
        "machine": machine_description(device, args.num_threads),
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "parameters": parameters,
        "log_history": trainer.state.log_history,
        "outputs": {"model": model_dir, "embeddings": os.path.join(out, "embeddings"), "runs": os.path.join(out, "runs"),
                    "data": os.path.join(out, "data"), **figures},
    }
    write_json(os.path.join(out, RESULTS), results)
    return results


__all__ = ["format_results_table", "machine_description", "next_steps", "run_demo"]
