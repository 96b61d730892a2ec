import os


# Nothing in the test-suite may reach a hub; tests that talk to the local hub server unset this themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
