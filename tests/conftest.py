import os


# Nothing in the test-suite may reach a hub; tests that talk to the local hub server unset this themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# ranx compiles each metric with numba on first use: ~45 s on an idle core, measured 338 s on a loaded 2-core CI
# machine, the largest single cost of a cold run. The tests' runs and qrels are tiny, so ranx's own Python code (the
# same source numba compiles) answers them in milliseconds; test_ranx_compiled.py checks, in a process where numba
# compiles, that compiled and interpreted metrics agree. Subprocesses inherit the setting.
os.environ.setdefault("NUMBA_DISABLE_JIT", "1")

import threading  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# the demo at test size (shared by test_demo.py and test_readme.py: one run per session)
DEMO_SMALL = ["--num-entities", "16", "--num-unseen-entities", "4", "--train-renderings", "4", "--max-steps", "160",
              "--eval-steps", "80"]  # fmt: skip


def tiny_config_kwargs(**overrides):
    """transformers-style tiny model: hidden 32, 2 layers, 4 heads; vocab 99 (last rows = <vis_extra_id_k>)."""
    kwargs = dict(
        vocab_size=99,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feat_dim=16,
        n_images=2,
        dropout_rate=0.0,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tiny_kwargs():
    return tiny_config_kwargs


def randomize_(model, seed=0):
    """Give every parameter (norm weights and biases too) random values of typical size, so that no path is an
    identity by accident: matrices ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.3), biases and embeddings ~ N(0, 0.5)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1 and ("norm" in name or name.endswith(".1.weight")):
                param.copy_(1.0 + 0.3 * noise)
            elif param.dim() == 2 and "embedding" not in name and "shared" not in name:
                param.copy_(noise * param.shape[1] ** -0.5)
            else:
                param.copy_(0.5 * noise)
    return model


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`vl-joint-encoder demo` at test size, once per session: (output folder, results.json)."""
    import json

    from vl_joint_encoder.commands.demo import main

    output_dir = str(tmp_path_factory.mktemp("demo") / "vl-joint-encoder-demo")
    assert main(DEMO_SMALL + ["--output-dir", output_dir]) == 0
    with open(os.path.join(output_dir, "results.json")) as handle:
        return output_dir, json.load(handle)


@pytest.fixture(scope="session")
def model_hub(tmp_path_factory):
    """A local Hub serving `google-t5/t5-base` and `openai/clip-vit-base-patch32` with their real architectures
    (fewer layers, random weights: tests/hub_models.py); `.folders` maps each id to its local copy."""
    from hub_models import serve_hub_models
    from hub_server import LocalHub

    server = LocalHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.folders = serve_hub_models(server, tmp_path_factory.mktemp("hub-models"))
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
