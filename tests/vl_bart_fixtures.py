"""Tiny VL-BART / VL-Adapter-BART checkpoints and a tiny BART tokenizer, built offline, in the ORIGINAL layout.

What the original code writes (docs/vl_bart_encoder_spec.md, "Checkpoint files"): `TrainerBase.save` is
`torch.save(self.model.state_dict(), "<name>.pth")` (j-min/VL-T5 a07d779 `src/trainer_base.py:211-214`,
ylsung/VL_adapter 545fcbb `VL-T5/src/trainer_base.py:549-556`) where `self.model` is a `VLBart...`
(a `BartForConditionalGeneration` subclass, `modeling_bart.py:403`) wrapped in DistributedDataParallel, so every key
starts with `module.`. One tensor (`model.shared.weight`) is stored under five names because the modules share it:
`model.shared`, `model.encoder.embed_tokens`, `model.encoder.visual_embedding.obj_order_embedding`,
`model.decoder.embed_tokens` and `lm_head` (set_input_embeddings + tie_weights after resize_token_embeddings;
the trainers assert it, j-min/VL-T5 `src/nlvr.py:91-92`). `final_logits_bias` is a zero buffer (1, vocab).

The dicts below are written by hand, key by key, in the order `Module.state_dict()` yields them for the original
classes (own parameters, own buffers, then children in registration order), so that a converter sees exactly what a
real file holds. Nothing here imports vl_joint_encoder, and nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


# transformers-test-sized model (hidden 32, 2 layers, 4 heads); ffn 37 so that no size coincides with another.
TINY = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    num_heads=4,  # not recorded in any tensor shape: it comes from the backbone config (bart-base: 12)
    ffn_dim=37,
    max_position_embeddings=64,  # embed_positions has max_position_embeddings + 2 rows (offset 2)
    feat_dim=16,
    pos_dim=4,
    n_images=2,
)
BASE_VOCAB_SIZE = 300  # tiny byte-level BPE: <s>=0 <pad>=1 </s>=2 <unk>=3 ... <mask>=299 (bart-base: 50265)
NUM_EXTRA_TOKENS = 200  # <extra_id_99..0> then <vis_extra_id_99..0>
VOCAB_SIZE = BASE_VOCAB_SIZE + NUM_EXTRA_TOKENS  # 500 (bart-base: 50465)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 1, 0, 2, 3
VL_ADAPTER_TASKS = ("vqa", "gqa", "nlvr", "caption")  # --tasks of VL_adapter scripts/image/multiple_adapters.sh
SHARED_ALIASES = (
    "model.encoder.embed_tokens.weight",
    "model.encoder.visual_embedding.obj_order_embedding.weight",
    "model.decoder.embed_tokens.weight",
    "lm_head.weight",
)

CORPUS = [
    "a photo of a cat sitting on a red sofa",
    "two dogs play with a ball in the park",
    "what color is the car parked near the house?",
    "the left image contains exactly two birds",
    "a man riding a brown horse on the beach",
    "is there a clock on the wall of the kitchen?",
    "vqa: how many people are in the picture?",
    "nlvr: there are more animals in the right image",
    "caption: a plate of food with broccoli and rice",
]


def extra_tokens() -> list[str]:
    """The 200 tokens the VL-BART trainers add, in their order (j-min/VL-T5 `src/pretrain.py:59-67`,
    VL_adapter `src/multitask.py:85-93`): `<extra_id_99>` ... `<extra_id_0>`, `<vis_extra_id_99>` ...
    `<vis_extra_id_0>`, so `<vis_extra_id_k>` = vocab - 1 - k, the row the object-order embedding reads."""
    return [f"<extra_id_{i}>" for i in range(99, -1, -1)] + [f"<vis_extra_id_{i}>" for i in range(99, -1, -1)]


def build_tiny_bart_tokenizer(with_extra_tokens: bool = True):
    """A BART-style tokenizer trained offline in well under a second.

    Byte-level BPE (as GPT-2/RoBERTa/BART) trained with the `tokenizers` library on CORPUS, special tokens at BART's
    ids (<s> 0, <pad> 1, </s> 2, <unk> 3) and <mask> the last id of the base vocabulary (50264 in bart-base), wrapped
    as transformers' BartTokenizer (in transformers 5 an alias of the tokenizers-backed RobertaTokenizer). Texts are
    encoded `<s> ... </s>` as BartTokenizer does. The 200 extra tokens are appended as additional special tokens with
    `add_special_tokens`, exactly as the original trainers do.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import BartTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB_SIZE - 1,  # <mask> comes last, after training
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    if len(vocab) != BASE_VOCAB_SIZE - 1:
        raise RuntimeError(f"tiny BPE has {len(vocab)} pieces, expected {BASE_VOCAB_SIZE - 1}: lengthen CORPUS")
    vocab["<mask>"] = BASE_VOCAB_SIZE - 1
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = BartTokenizer(vocab=vocab, merges=merges, mask_token=AddedToken("<mask>", lstrip=True, rstrip=False))
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        BOS_ID,
        PAD_ID,
        EOS_ID,
        UNK_ID,
    )
    assert tokenizer.mask_token_id == BASE_VOCAB_SIZE - 1 and len(tokenizer) == BASE_VOCAB_SIZE
    if with_extra_tokens:
        added = tokenizer.add_special_tokens({"additional_special_tokens": extra_tokens()})
        assert added == NUM_EXTRA_TOKENS and len(tokenizer) == VOCAB_SIZE
    return tokenizer


# --------------------------------------------------------------------------------------------- random tensors
class _Random:
    """Tensors of typical size so that no path is an identity by accident (like conftest.randomize_): matrices
    ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.3), biases ~ N(0, 0.3), embeddings ~ N(0, 0.5)."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(shape, generator=self.generator)

    def linear(self, state, prefix, out_features, in_features, bias=True):
        state[prefix + "weight"] = self.normal(out_features, in_features, std=in_features**-0.5)  # (out, in)
        if bias:
            state[prefix + "bias"] = self.normal(out_features, std=0.3)  # (out,)

    def layer_norm(self, state, prefix, dim):
        state[prefix + "weight"] = self.normal(dim, std=0.3, mean=1.0)  # (d,)
        state[prefix + "bias"] = self.normal(dim, std=0.3)  # (d,)


def _attention(rnd, state, prefix, d):
    for name in ("k_proj", "v_proj", "q_proj", "out_proj"):  # registration order of BartAttention.__init__
        rnd.linear(state, f"{prefix}{name}.", d, d)


def _adapter_controller(rnd, state, prefix, d, tasks, reduction_factor, single, pre_norm, post_norm):
    """AdapterController (VL_adapter `src/adapters/adapter_controller.py:11-36`): `adapters` is a ModuleDict
    task -> Adapter(down_sampler: Linear(d, d // r), up_sampler: Linear(d // r, d)); with use_single_adapter the
    SAME module is registered under every task name (lines 49-58), so state_dict() lists it once per task and the
    tensors alias. Optional pre/post LayerNorms (`--add_layer_norm_before/after_adapter`, off in the scripts)."""
    hidden = d // reduction_factor
    shared = None
    for task in tasks:
        p = f"{prefix}adapters.{task}."
        if single and shared is not None:
            for key, value in shared.items():
                state[p + key] = value
            continue
        one = {}
        rnd.linear(one, "down_sampler.", hidden, d)
        rnd.linear(one, "up_sampler.", d, hidden)
        for key, value in one.items():
            state[p + key] = value
        shared = one
    if pre_norm:
        rnd.layer_norm(state, prefix + "pre_layer_norm.", d)
    if post_norm:
        rnd.layer_norm(state, prefix + "post_layer_norm.", d)


def vl_bart_state_dict(
    seed: int = 0,
    *,
    individual_vis_layer_norm: bool = False,
    use_vis_layer_norm: bool = True,
    use_vis_order_embedding: bool = True,
    tasks: tuple[str, ...] = (),
    use_single_adapter: bool = False,
    reduction_factor: int = 8,
    adapter_layer_norm_before: bool = False,
    adapter_layer_norm_after: bool = False,
    add_adapter_cross_attn: bool = True,
    answer_head: bool = False,
    ddp: bool = True,
    vocab_size: int = VOCAB_SIZE,
    **sizes,
) -> dict[str, torch.Tensor]:
    """A random VLBart state dict, key for key as the original `VLBart.state_dict()` (under DDP: `module.`).

    Defaults = VL-BART of j-min/VL-T5 as its released scripts run it (`--individual_vis_layer_norm False`, so one
    `visual_embedding.layer_norm` after the sum). VL-Adapter: pass `tasks=VL_ADAPTER_TASKS` and
    `individual_vis_layer_norm=True` (its scripts keep the default True), or use `vl_adapter_bart_state_dict`.
    `sizes` overrides TINY (d_model, encoder_layers, decoder_layers, ffn_dim, max_position_embeddings, feat_dim,
    pos_dim, n_images). The shared embedding has `vocab_size` rows; its last 100 rows are `<vis_extra_id_99..0>`.
    """
    cfg = dict(TINY, **sizes)
    d, ffn, feat_dim, pos_dim = cfg["d_model"], cfg["ffn_dim"], cfg["feat_dim"], cfg["pos_dim"]
    positions = cfg["max_position_embeddings"] + 2  # BartLearnedPositionalEmbedding: num_embeddings + offset 2
    rnd = _Random(seed)
    adapters = dict(
        tasks=tasks,
        reduction_factor=reduction_factor,
        single=use_single_adapter,
        pre_norm=adapter_layer_norm_before,
        post_norm=adapter_layer_norm_after,
    )

    state: dict[str, torch.Tensor] = {}
    # VLBart.__init__ (modeling_bart.py:412-418): model, then buffer final_logits_bias, then lm_head; state_dict()
    # yields a module's own buffers before its children, so final_logits_bias comes first.
    state["final_logits_bias"] = torch.zeros(1, vocab_size)  # (1, vocab): a buffer, never trained
    shared = rnd.normal(vocab_size, d, std=0.5)  # (vocab, d)
    state["model.shared.weight"] = shared

    # --- JointEncoder(BartEncoder): embed_tokens (= shared), embed_positions, layers, layernorm_embedding,
    #     visual_embedding (j-min/VL-T5 modeling_bart.py:146-157; transformers 4.2.1 BartEncoder.__init__)
    e = "model.encoder."
    state[e + "embed_tokens.weight"] = shared
    state[e + "embed_positions.weight"] = rnd.normal(positions, d, std=0.5)  # (max_pos + 2, d)
    for i in range(cfg["encoder_layers"]):
        lp = f"{e}layers.{i}."
        _attention(rnd, state, lp + "self_attn.", d)
        rnd.layer_norm(state, lp + "self_attn_layer_norm.", d)
        rnd.linear(state, lp + "fc1.", ffn, d)  # (ffn, d)
        rnd.linear(state, lp + "fc2.", d, ffn)  # (d, ffn)
        rnd.layer_norm(state, lp + "final_layer_norm.", d)
        if tasks:  # VL_adapter my_transformers/modeling_bart.py:453-455: attn_adapter, ff_adapter
            _adapter_controller(rnd, state, lp + "attn_adapter.", d, **adapters)
            _adapter_controller(rnd, state, lp + "ff_adapter.", d, **adapters)
    rnd.layer_norm(state, e + "layernorm_embedding.", d)

    # VisualEmbedding (j-min/VL-T5 modeling_bart.py:31-72; VL_adapter modeling_bart.py:76-126)
    v = e + "visual_embedding."
    rnd.linear(state, v + "feat_embedding.0.", d, feat_dim)  # (d, feat_dim)
    if individual_vis_layer_norm and use_vis_layer_norm:
        rnd.layer_norm(state, v + "feat_embedding.1.", d)
    rnd.linear(state, v + "absolute_vis_pos_embedding.0.", d, pos_dim + 1)  # (d, 5): x1, y1, x2, y2, "area"
    if individual_vis_layer_norm and use_vis_layer_norm:
        rnd.layer_norm(state, v + "absolute_vis_pos_embedding.1.", d)
    # obj_order_embedding is the shared table. VLBartModel.set_input_embeddings assigns it even when
    # use_vis_order_embedding is False (modeling_bart.py:300-305, called by resize_token_embeddings), so the alias key
    # is in every file (then registered last); img_order_embedding exists only with use_vis_order_embedding.
    if use_vis_order_embedding:
        state[v + "obj_order_embedding.weight"] = shared
        state[v + "img_order_embedding.weight"] = rnd.normal(cfg["n_images"], d, std=0.5)  # (n_images, d)
    if use_vis_layer_norm and not individual_vis_layer_norm:
        rnd.layer_norm(state, v + "layer_norm.", d)
    if not use_vis_order_embedding:
        state[v + "obj_order_embedding.weight"] = shared

    # --- BartDecoder: embed_tokens (= shared), embed_positions, layers, layernorm_embedding (to ignore)
    dec = "model.decoder."
    state[dec + "embed_tokens.weight"] = shared
    state[dec + "embed_positions.weight"] = rnd.normal(positions, d, std=0.5)
    for i in range(cfg["decoder_layers"]):
        lp = f"{dec}layers.{i}."
        _attention(rnd, state, lp + "self_attn.", d)
        rnd.layer_norm(state, lp + "self_attn_layer_norm.", d)
        _attention(rnd, state, lp + "encoder_attn.", d)
        rnd.layer_norm(state, lp + "encoder_attn_layer_norm.", d)
        rnd.linear(state, lp + "fc1.", ffn, d)
        rnd.linear(state, lp + "fc2.", d, ffn)
        rnd.layer_norm(state, lp + "final_layer_norm.", d)
        if tasks:  # VL_adapter my_transformers/modeling_bart.py:574-581
            _adapter_controller(rnd, state, lp + "self_attn_adapter.", d, **adapters)
            if add_adapter_cross_attn:
                _adapter_controller(rnd, state, lp + "enc_attn_adapter.", d, **adapters)
            _adapter_controller(rnd, state, lp + "ff_adapter.", d, **adapters)
    rnd.layer_norm(state, dec + "layernorm_embedding.", d)

    state["lm_head.weight"] = shared  # tied (1 tensor, 5 names)
    if answer_head:  # VLBartVQA with --classifier: Sequential(Linear, GELU, LayerNorm, Linear) (vqa_model.py)
        rnd.linear(state, "answer_head.0.", 2 * d, d)
        rnd.layer_norm(state, "answer_head.2.", 2 * d)
        rnd.linear(state, "answer_head.3.", 7, 2 * d)
    if ddp:
        state = {"module." + k: t for k, t in state.items()}
    return state


def vl_adapter_bart_state_dict(seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    """VL-Adapter's VL-BART as scripts/image/multiple_adapters.sh trains it: adapters for vqa, gqa, nlvr, caption,
    reduction factor 8, per-projection visual LayerNorms (individual_vis_layer_norm keeps its default True).
    Pass use_single_adapter=True for single_adapter.sh (one adapter registered under every task name)."""
    kwargs = dict(tasks=VL_ADAPTER_TASKS, individual_vis_layer_norm=True, reduction_factor=8)
    kwargs.update(overrides)
    return vl_bart_state_dict(seed, **kwargs)


def save_checkpoint(state: dict, path) -> Path:
    """torch.save the state dict as the original trainers do (`Epoch30.pth`, `LAST.pth`, `BEST.pth`); tensors that
    alias in memory are stored once and alias again after torch.load(..., weights_only=True)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def encoder_keys(state: dict) -> list[str]:
    """Keys the joint encoder reads (DDP prefix kept): everything under model.encoder., plus model.shared.weight."""
    keys = []
    for key in state:
        bare = key[len("module.") :] if key.startswith("module.") else key
        if bare.startswith("model.encoder.") or bare == "model.shared.weight":
            keys.append(key)
    return keys


def bart_config_kwargs(**overrides) -> dict:
    """transformers.BartConfig arguments matching the fixtures (eval-exact: no dropout, no layerdrop)."""
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        d_model=TINY["d_model"],
        encoder_layers=TINY["encoder_layers"],
        decoder_layers=TINY["decoder_layers"],
        encoder_attention_heads=TINY["num_heads"],
        decoder_attention_heads=TINY["num_heads"],
        encoder_ffn_dim=TINY["ffn_dim"],
        decoder_ffn_dim=TINY["ffn_dim"],
        max_position_embeddings=TINY["max_position_embeddings"],
        activation_function="gelu",
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        scale_embedding=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=EOS_ID,
    )
    kwargs.update(overrides)
    return kwargs
