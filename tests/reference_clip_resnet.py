"""An independent functional forward of OpenAI CLIP's ModifiedResNet image tower, for tests.

Written from openai/CLIP `clip/model.py` (Bottleneck, AttentionPool2d, ModifiedResNet.forward) as plain torch
functions over the ORIGINAL state dict (`visual.conv1.weight`, `visual.layer1.0.downsample.0.weight`,
`visual.attnpool.positional_embedding`, ...). It shares no code with `vl_joint_encoder/clip_resnet.py`: the sizes
are read off the state dict the way `build_model` does, BatchNorm is `F.batch_norm` in eval mode, and the attention
pool is `F.multi_head_attention_forward` with every token as a query (the 2021 CLIP code, which VL-Adapter's copy
keeps) and row 0 taken, whereas the model under test computes only the mean token's query by hand.

Also `random_openai_visual_state_dict`, a random-weight state dict in the OpenAI layout with statistics that keep the
activations O(1) through deep towers (so an fp32 comparison at 1e-5 is meaningful), and a few OpenAI-order helpers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _bn(x, sd, name, eps=1e-5):
    return F.batch_norm(
        x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"], sd[f"{name}.bias"],
        training=False, momentum=0.0, eps=eps,
    )


def _blocks(sd, prefix, stage):
    ids = sorted({int(k[len(f"{prefix}layer{stage}."):].split(".")[0]) for k in sd if k.startswith(f"{prefix}layer{stage}.")})
    return ids


def reference_forward(sd: dict, pixel_values: torch.Tensor, prefix: str = "visual."):
    """Returns (layer4 feature map (N, C, g, g), attention-pool output (N, output_dim), per-stage maps [stem, l1..l4])."""
    x = pixel_values.to(sd[f"{prefix}conv1.weight"].dtype)
    # stem: conv(s2) bn relu, conv bn relu, conv bn relu, avgpool(2)
    x = F.relu(_bn(F.conv2d(x, sd[f"{prefix}conv1.weight"], stride=2, padding=1), sd, f"{prefix}bn1"))
    x = F.relu(_bn(F.conv2d(x, sd[f"{prefix}conv2.weight"], padding=1), sd, f"{prefix}bn2"))
    x = F.relu(_bn(F.conv2d(x, sd[f"{prefix}conv3.weight"], padding=1), sd, f"{prefix}bn3"))
    x = F.avg_pool2d(x, 2)
    maps = [x]
    for stage in (1, 2, 3, 4):
        for block in _blocks(sd, prefix, stage):
            p = f"{prefix}layer{stage}.{block}"
            stride = 2 if (stage > 1 and block == 0) else 1
            identity = x
            out = F.relu(_bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
            out = F.relu(_bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), sd, f"{p}.bn2"))
            if stride > 1:
                out = F.avg_pool2d(out, stride)
            out = _bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
            if f"{p}.downsample.0.weight" in sd:
                shortcut = F.avg_pool2d(x, stride) if stride > 1 else x
                identity = _bn(F.conv2d(shortcut, sd[f"{p}.downsample.0.weight"]), sd, f"{p}.downsample.1")
            x = F.relu(out + identity)
        maps.append(x)
    # AttentionPool2d (2021 version: query = all tokens, keep row 0)
    a = f"{prefix}attnpool"
    seq = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)  # (HW, N, C)
    seq = torch.cat([seq.mean(dim=0, keepdim=True), seq], dim=0)
    seq = seq + sd[f"{a}.positional_embedding"][:, None, :].to(seq.dtype)
    width = sd[f"{prefix}layer1.0.conv1.weight"].shape[0]
    heads = width * 32 // 64
    pooled, _ = F.multi_head_attention_forward(
        query=seq, key=seq, value=seq, embed_dim_to_check=seq.shape[-1], num_heads=heads,
        q_proj_weight=sd[f"{a}.q_proj.weight"], k_proj_weight=sd[f"{a}.k_proj.weight"],
        v_proj_weight=sd[f"{a}.v_proj.weight"], in_proj_weight=None,
        in_proj_bias=torch.cat([sd[f"{a}.q_proj.bias"], sd[f"{a}.k_proj.bias"], sd[f"{a}.v_proj.bias"]]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=sd[f"{a}.c_proj.weight"], out_proj_bias=sd[f"{a}.c_proj.bias"],
        use_separate_proj_weight=True, training=False, need_weights=False,
    )
    return x, pooled[0], maps


def random_openai_visual_state_dict(
    layers=(3, 4, 6, 3), width=64, image_size=224, output_dim=1024, seed=0, prefix="visual.", with_text=True
) -> dict:
    """Random weights in OpenAI's layout (written out by hand from openai/CLIP `clip/model.py`'s module tree)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name, cout, cin, k):
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5

    def bn(name, c, scale=(0.5, 1.5)):
        lo, hi = scale
        sd[f"{name}.weight"] = lo + (hi - lo) * torch.rand(c, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=g)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(0)

    conv(f"{prefix}conv1", width // 2, 3, 3)
    bn(f"{prefix}bn1", width // 2)
    conv(f"{prefix}conv2", width // 2, width // 2, 3)
    bn(f"{prefix}bn2", width // 2)
    conv(f"{prefix}conv3", width, width // 2, 3)
    bn(f"{prefix}bn3", width)
    inplanes = width
    for stage, blocks in enumerate(layers, start=1):
        planes = width * 2 ** (stage - 1)
        for block in range(blocks):
            p = f"{prefix}layer{stage}.{block}"
            conv(f"{p}.conv1", planes, inplanes, 1)
            bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3)
            bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", planes * 4, planes, 1)
            bn(f"{p}.bn3", planes * 4, scale=(0.1, 0.3))  # small residual branches keep deep towers O(1)
            if block == 0 and (stage > 1 or inplanes != planes * 4):
                conv(f"{p}.downsample.0", planes * 4, inplanes, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    embed = width * 32
    grid = image_size // 32
    a = f"{prefix}attnpool"
    sd[f"{a}.positional_embedding"] = torch.randn(grid * grid + 1, embed, generator=g) / embed**0.5
    for name, out in (("k_proj", embed), ("q_proj", embed), ("v_proj", embed), ("c_proj", output_dim)):
        sd[f"{a}.{name}.weight"] = torch.randn(out, embed, generator=g) * embed**-0.5
        sd[f"{a}.{name}.bias"] = 0.02 * torch.randn(out, generator=g)
    if with_text:  # a few text-tower keys, as in a full CLIP state dict, that a visual loader must ignore
        sd["logit_scale"] = torch.tensor(4.6052)
        sd["text_projection"] = torch.randn(8, output_dim, generator=g)
        sd["token_embedding.weight"] = torch.randn(10, 8, generator=g)
    return sd
