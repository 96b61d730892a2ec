"""
`vl-joint-encoder train CONFIG` killed (SIGKILL) in the middle of a checkpoint save, for the fault test in
tests/test_trainer_checkpoints.py:

    python tests/scripts/checkpoint_training.py CONFIG.json WRITE_INDEX MODE

counts the files written while `JointEncoderTrainer._save_checkpoint` runs (weights, optimizer.pt, scheduler.pt,
rng_state.pth, trainer_state.json, the completeness marker) and at write number WRITE_INDEX (1-based) kills the
process: MODE "before" (the file is not written), "truncated" (written, then cut to half its bytes, as a kill during
a write leaves it). Exit status -9 / 137 when the kill happened, 0 if training ended first.
"""

from __future__ import annotations

import os
import signal
import sys


def install(kill_at: int, mode: str) -> None:
    import safetensors.torch
    import torch
    import transformers.modeling_utils
    from transformers.trainer_callback import TrainerState

    from vl_joint_encoder.training import checkpoints
    from vl_joint_encoder.training.trainer import JointEncoderTrainer

    state = {"saving": False, "writes": 0}

    def die_or_write(path, write):
        if not state["saving"]:
            return write()
        state["writes"] += 1
        if state["writes"] != kill_at:
            return write()
        if mode == "truncated" and isinstance(path, (str, os.PathLike)):
            write()
            with open(path, "r+b") as handle:
                handle.truncate(os.path.getsize(path) // 2)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    original_save = torch.save
    torch.save = lambda obj, f, *a, **k: die_or_write(f, lambda: original_save(obj, f, *a, **k))
    original_safe = safetensors.torch.save_file
    transformers.modeling_utils.safe_save_file = lambda tensors, filename, *a, **k: die_or_write(
        filename, lambda: original_safe(tensors, filename, *a, **k)
    )
    original_json = TrainerState.save_to_json
    TrainerState.save_to_json = lambda self, path: die_or_write(path, lambda: original_json(self, path))
    original_marker = checkpoints.write_json
    checkpoints.write_json = lambda path, *a, **k: die_or_write(None, lambda: original_marker(path, *a, **k))
    original_checkpoint = JointEncoderTrainer._save_checkpoint

    def save_checkpoint(self, *args, **kwargs):
        state["saving"] = True
        try:
            return original_checkpoint(self, *args, **kwargs)
        finally:
            state["saving"] = False

    JointEncoderTrainer._save_checkpoint = save_checkpoint


if __name__ == "__main__":
    config, kill_at, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    install(kill_at, mode)
    from vl_joint_encoder.commands.train import main

    sys.exit(main([config]))
