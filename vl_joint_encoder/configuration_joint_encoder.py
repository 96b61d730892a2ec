"""Configuration of the VL-T5 / VL-BART joint encoder (text + visual tokens through one encoder) used as a retriever.

One configuration (and one modeling file) serves both backbones of the VL-T5 paper: `backbone="t5"` (VL-T5 and
VL-Adapter on T5) and `backbone="bart"` (VL-BART and VL-Adapter on BART). One class rather than a second model type
because everything around the encoder is the same: the visual embedding, the retrieval head, the processor, the
trainer, encoding and search all take a `JointEncoderModel`, and the remote-code export stays two files that import
only each other. Fields a backbone does not use are `None` (e.g. `relative_attention_num_buckets` for BART,
`max_position_embeddings` for T5); fields whose defaults differ take the backbone's default when left out.
"""

from __future__ import annotations

import re

import transformers


MIN_TRANSFORMERS_MAJOR = 5


def check_transformers_version(version: str | None = None) -> None:
    """
    Refuse, with the fix, a transformers older than 5: this file and the model file (also when loaded from a model
    folder with `trust_remote_code=True`) use transformers 5's API (`PreTrainedConfig`, attention interfaces, ...),
    whose absence would otherwise surface as an obscure ImportError or AttributeError deep in the code.
    """
    version = version or transformers.__version__
    major = re.match(r"\d+", version)
    if major is None or int(major.group()) < MIN_TRANSFORMERS_MAJOR:
        raise ImportError(
            f"the VL-T5 / VL-BART joint encoder code (vl-joint-encoder, also as remote code of a model folder) needs "
            f"transformers >= {MIN_TRANSFORMERS_MAJOR}, but transformers {version} is installed: "
            f"pip install -U 'transformers>={MIN_TRANSFORMERS_MAJOR},<{MIN_TRANSFORMERS_MAJOR + 1}'"
        )


check_transformers_version()  # before importing the names transformers 5 has and 4 lacks

from transformers import PreTrainedConfig  # noqa: E402
from transformers.utils import logging  # noqa: E402


logger = logging.get_logger(__name__)

POOLING_MODES = ("mean", "text_mean", "visual_mean", "first")
SIMILARITIES = ("dot", "cosine")
BOX_AREA_MODES = ("vl_t5", "xyxy")
VISION_FEATURE_SELECTS = ("patch", "cls_patch")
VISION_BOX_MODES = ("grid", "zeros")
FEED_FORWARD_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu")
BACKBONES = ("t5", "bart")
# Defaults that differ by backbone: the released VL-T5 (t5-base) and VL-BART (facebook/bart-base) checkpoints.
BACKBONE_DEFAULTS = {
    "t5": dict(
        vocab_size=32200, num_layers=12, layer_norm_epsilon=1e-6, feed_forward_proj="relu",
        relative_attention_num_buckets=32, relative_attention_max_distance=128, max_position_embeddings=None,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    ),
    "bart": dict(
        vocab_size=50465, num_layers=6, layer_norm_epsilon=1e-5, feed_forward_proj="gelu",
        relative_attention_num_buckets=None, relative_attention_max_distance=None, max_position_embeddings=1024,
        pad_token_id=1, eos_token_id=2, bos_token_id=0,
    ),
}


class JointEncoderConfig(PreTrainedConfig):
    r"""
    Configuration of a [`JointEncoderModel`]: the encoder of VL-T5 / VL-BART (Cho et al., 2021) and VL-Adapter
    (Sung et al., 2022) with a retrieval head. Text field names follow transformers' `T5Config` (for both backbones);
    visual field names follow VL-T5. The defaults are those of the released VL-T5 (t5-base) checkpoints, or with
    `backbone="bart"` of the released VL-BART (facebook/bart-base) ones, with a cosine-similarity retrieval head.

    Backbone:
        backbone (`str`, defaults to `"t5"`): `"t5"`: pre-norm T5 blocks (RMS norms, relative position bias on text x
            text pairs, final norm). `"bart"`: post-norm BART encoder layers (LayerNorm with bias, learned text
            positions with offset 2, `layernorm_embedding`, q/k/v/out biases, no final norm), as VL-BART's
            `JointEncoder(BartEncoder)` (docs/vl_bart_encoder_spec.md).

    Text encoder (`T5Config` names; the `BartConfig` name in brackets):
        vocab_size (`int`, defaults to 32200 / 50465 for bart): the base vocabulary + 100 `<extra_id_*>` + 100
            `<vis_extra_id_*>`. The last rows double as the object-order embedding (`<vis_extra_id_k>` = vocab_size-1-k).
        d_model (`int`, defaults to 768): hidden size.
        d_kv (`int`, defaults to 64; bart: `d_model // num_heads`): size of each attention head. BART's heads split
            `d_model`, so there `d_kv * num_heads` must equal `d_model`.
        d_ff (`int`, defaults to 3072) [`encoder_ffn_dim`]: inner size of the feed-forward layer.
        num_layers (`int`, defaults to 12 / 6 for bart) [`encoder_layers`]: number of blocks.
        num_heads (`int`, defaults to 12) [`encoder_attention_heads`]: attention heads per block.
        relative_attention_num_buckets (`int`, defaults to 32; None for bart) / relative_attention_max_distance
            (`int`, 128; None for bart): T5 relative position buckets (bidirectional), applied to text x text pairs.
        max_position_embeddings (`int`, defaults to 1024 for bart; None for t5): learned text positions (BART's table
            has `max_position_embeddings + 2` rows, looked up at `position + 2`). Visual tokens get none.
        scale_embedding (`bool`, defaults to False): bart: multiply token embeddings by sqrt(d_model)
            (False for bart-base and bart-large).
        share_vis_lang_layer_norm (`bool`, defaults to False): bart: apply `layernorm_embedding` to the visual tokens
            too (VL-BART's `--share_vis_lang_layer_norm`; off in every released script).
        dropout_rate (`float`, defaults to 0.1) [`dropout`]: dropout everywhere T5 applies it (train mode only); for
            bart after the embeddings (once, after the concatenation, as VL-BART), the attention output and the
            feed-forward output.
        attention_dropout / activation_dropout (`float`, *optional*): bart: dropout of the attention probabilities
            and after the feed-forward activation; default `dropout_rate` (VL-BART's trainers set all three to
            `--dropout`).
        layer_norm_epsilon (`float`, defaults to 1e-6 / 1e-5 for bart): epsilon of every norm.
        initializer_factor (`float`, defaults to 1.0): T5's weight-init scale; for bart, init std = 0.02 * factor.
        feed_forward_proj (`str`, defaults to `"relu"` / `"gelu"` for bart) [`activation_function`]: `"relu"` (T5) or
            `"gated-gelu"` (T5 v1.1) or `"gated-{act}"`/`"{act}"` with act in relu, gelu, gelu_new,
            gelu_pytorch_tanh, silu; bart: not gated (BART's `"gelu"` is the exact erf GELU).
        pad_token_id (`int`, defaults to 0 / 1 for bart), eos_token_id (`int`, 1 / 2), bos_token_id (None / 0).

    Visual embedding (as in the VL-T5 spec; the same for both backbones except the norm):
        feat_dim (`int`, defaults to 2048): size of each visual feature (Faster R-CNN 2048, CLIP RN101 grid 2048).
        pos_dim (`int`, defaults to 4): box coordinates (x1, y1, x2, y2) in [0, 1]; the area is appended.
        n_images (`int`, defaults to 2): rows of the image-order embedding (images per query).
        use_vis_order_embedding (`bool`, defaults to True): add image-order and object-order embeddings.
        use_vis_layer_norm (`bool`, defaults to True): norms in the visual embedding (RMS norms for t5, LayerNorms
            with bias for bart).
        individual_vis_layer_norm (`bool`, defaults to True, the original `param.py` default): one norm after each
            projection (VL-T5, VL-Adapter on either backbone) rather than one norm after the sum (what every released
            VL-BART script sets, `--individual_vis_layer_norm False`; the converter reads the layout off the keys).
        box_area (`str`, defaults to `"vl_t5"`): `"vl_t5"` reproduces VL-T5's area quirk `(y2 - x2) * (y1 - x1)` that
            released checkpoints were trained with; `"xyxy"` uses the true area `(x2 - x1) * (y2 - y1)`.
        visual_downsample_size (`int`, *optional*): if set (VL-Adapter: 6), each image's square grid of visual tokens
            (e.g. 7x7 = 49) is adaptive-max-pooled to `size x size` tokens before embedding; each image's boxes,
            masks and order ids are cut to its first `size**2` tokens (VL-Adapter's `Downsample`: two images are
            pooled separately, 98 -> 72 tokens).
        adapter_reduction_factor (`int`, *optional*): if set, bottleneck adapters (VL-Adapter) of size
            `d_model // adapter_reduction_factor` follow each attention output projection and each feed-forward.
        adapter_act (`str`, defaults to `"gelu_new"`): adapter non-linearity (tanh-approximated GELU in VL-Adapter).

    Frozen vision tower (optional):
        vision_config (`PreTrainedConfig` or `dict`, *optional*): config of a transformers vision model exposing
            patch tokens (`CLIPVisionConfig` first; `SiglipVisionConfig` works too). When set, the model holds that
            tower, frozen, and `forward` accepts `pixel_values`. `feat_dim` must equal its hidden size.
        vision_feature_layer (`int`, defaults to -1): index into the tower's hidden states (-1: last layer, -2: the
            penultimate as in LLaVA).
        vision_feature_select (`str`, defaults to `"patch"`): `"patch"` drops the CLS token, `"cls_patch"` keeps it.
        vision_grid_pool_size (`int`, *optional*): adaptive average pooling of the patch grid to `size x size`.
        vision_box_mode (`str`, defaults to `"grid"`): `"grid"` gives each visual token its cell's normalised box,
            `"zeros"` gives zero boxes (as VL-Adapter did with CLIP grids).
        vision_tower_dtype (`str`, *optional*): dtype the frozen tower runs in (e.g. `"bfloat16"` on GPU).

    Inputs:
        text_prefix (`str`, *optional*): the text prefix of the source task (e.g. `"vqa: "`, as the original loaders
            encode `f"vqa: {question}"`), written by the converter; the processor built for this config prepends it
            to every text unless told not to (`JointEncoderProcessor(add_text_prefix=False)`).

    Retrieval head:
        pooling (`str`, defaults to `"mean"`): `"mean"` (masked mean over text and visual tokens), `"text_mean"`,
            `"visual_mean"` or `"first"` (first token).
        projection_dim (`int`, *optional*): if set, a linear projection (with bias) of the pooled vector.
        normalize (`bool`, defaults to True): L2-normalise `pooler_output`.
        similarity (`str`, defaults to `"cosine"`): score used by the training loss AND by search: `"dot"` or
            `"cosine"`. Cosine normalises both sides whatever `normalize` says.
        logit_scale (`float`, defaults to 20.0): the loss multiplies similarities by it (scale = 1 / temperature;
            20 = temperature 0.05 as in sentence-transformers). Use 1.0 with `"dot"` (DPR).

    Example:

    ```python
    >>> from vl_joint_encoder import JointEncoderConfig, JointEncoderModel
    >>> config = JointEncoderConfig(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feat_dim=16)
    >>> model = JointEncoderModel(config)
    >>> bart = JointEncoderModel(JointEncoderConfig(backbone="bart", d_model=32, d_ff=64, num_layers=2, num_heads=4))
    ```
    """

    model_type = "vl_joint_encoder"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_layers",
        "head_dim": "d_kv",
    }

    def __init__(
        self,
        vocab_size: int | None = None,
        d_model: int = 768,
        d_kv: int | None = None,
        d_ff: int = 3072,
        num_layers: int | None = None,
        num_heads: int = 12,
        relative_attention_num_buckets: int | None = None,
        relative_attention_max_distance: int | None = None,
        dropout_rate: float = 0.1,
        layer_norm_epsilon: float | None = None,
        initializer_factor: float = 1.0,
        feed_forward_proj: str | None = None,
        feat_dim: int = 2048,
        pos_dim: int = 4,
        n_images: int = 2,
        use_vis_order_embedding: bool = True,
        use_vis_layer_norm: bool = True,
        individual_vis_layer_norm: bool = True,
        box_area: str = "vl_t5",
        visual_downsample_size: int | None = None,
        adapter_reduction_factor: int | None = None,
        adapter_act: str = "gelu_new",
        vision_config=None,
        vision_feature_layer: int = -1,
        vision_feature_select: str = "patch",
        vision_grid_pool_size: int | None = None,
        vision_box_mode: str = "grid",
        vision_tower_dtype: str | None = None,
        pooling: str = "mean",
        projection_dim: int | None = None,
        normalize: bool = True,
        similarity: str = "cosine",
        logit_scale: float = 20.0,
        pad_token_id: int | None = None,
        eos_token_id: int | None = None,
        backbone: str = "t5",
        max_position_embeddings: int | None = None,
        scale_embedding: bool = False,
        share_vis_lang_layer_norm: bool = False,
        attention_dropout: float | None = None,
        activation_dropout: float | None = None,
        text_prefix: str | None = None,
        **kwargs,
    ):
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES} ('t5': VL-T5, 'bart': VL-BART), got {backbone!r}")
        defaults = BACKBONE_DEFAULTS[backbone]
        vocab_size = defaults["vocab_size"] if vocab_size is None else vocab_size
        num_layers = defaults["num_layers"] if num_layers is None else num_layers
        layer_norm_epsilon = defaults["layer_norm_epsilon"] if layer_norm_epsilon is None else layer_norm_epsilon
        feed_forward_proj = defaults["feed_forward_proj"] if feed_forward_proj is None else feed_forward_proj
        pad_token_id = defaults["pad_token_id"] if pad_token_id is None else pad_token_id
        eos_token_id = defaults["eos_token_id"] if eos_token_id is None else eos_token_id
        if defaults["bos_token_id"] is not None:
            kwargs.setdefault("bos_token_id", defaults["bos_token_id"])
        if backbone == "t5":
            if relative_attention_num_buckets is None:
                relative_attention_num_buckets = defaults["relative_attention_num_buckets"]
            if relative_attention_max_distance is None:
                relative_attention_max_distance = defaults["relative_attention_max_distance"]
            d_kv = 64 if d_kv is None else d_kv
        else:
            if max_position_embeddings is None:
                max_position_embeddings = defaults["max_position_embeddings"]
            if isinstance(num_heads, int) and not isinstance(num_heads, bool) and num_heads > 0 and d_kv is None:
                d_kv = d_model // num_heads

        def positive_int(name, value, optional=False):
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")

        for name, value in (
            ("vocab_size", vocab_size),
            ("d_model", d_model),
            ("d_kv", d_kv),
            ("d_ff", d_ff),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("feat_dim", feat_dim),
            ("pos_dim", pos_dim),
            ("n_images", n_images),
        ):
            positive_int(name, value)
        for name, value in (
            ("visual_downsample_size", visual_downsample_size),
            ("adapter_reduction_factor", adapter_reduction_factor),
            ("vision_grid_pool_size", vision_grid_pool_size),
            ("projection_dim", projection_dim),
        ):
            positive_int(name, value, optional=True)
        if backbone == "t5":
            positive_int("relative_attention_num_buckets", relative_attention_num_buckets)
            positive_int("relative_attention_max_distance", relative_attention_max_distance)
            if relative_attention_num_buckets % 2:
                raise ValueError(
                    f"relative_attention_num_buckets must be even (T5 splits buckets between the two directions), "
                    f"got {relative_attention_num_buckets}"
                )
            for name, value in (("max_position_embeddings", max_position_embeddings),
                                ("attention_dropout", attention_dropout), ("activation_dropout", activation_dropout)):
                if value is not None:
                    raise ValueError(f"{name} is a backbone='bart' field; a T5 joint encoder has none (leave it None)")
            if scale_embedding or share_vis_lang_layer_norm:
                raise ValueError("scale_embedding / share_vis_lang_layer_norm are backbone='bart' fields (leave False)")
        else:
            positive_int("max_position_embeddings", max_position_embeddings)
            for name, value in (("relative_attention_num_buckets", relative_attention_num_buckets),
                                ("relative_attention_max_distance", relative_attention_max_distance)):
                if value is not None:
                    raise ValueError(f"{name} is a T5 field: BART has learned positions instead (leave it None)")
            if d_kv * num_heads != d_model:
                raise ValueError(
                    f"backbone='bart' splits d_model over the heads: d_kv ({d_kv}) x num_heads ({num_heads}) must equal "
                    f"d_model ({d_model})"
                )
            if str(feed_forward_proj).startswith("gated-"):
                raise ValueError(f"backbone='bart' has no gated feed-forward, got feed_forward_proj {feed_forward_proj!r}")
            for name, value in (("attention_dropout", attention_dropout), ("activation_dropout", activation_dropout)):
                if value is not None and not 0.0 <= float(value) < 1.0:
                    raise ValueError(f"{name} must be in [0, 1) or None (= dropout_rate), got {value}")
        if pos_dim != 4:
            raise ValueError(f"pos_dim must be 4 (boxes x1, y1, x2, y2; the area is appended), got {pos_dim}")
        if not 0.0 <= float(dropout_rate) < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        if not float(layer_norm_epsilon) > 0:
            raise ValueError(f"layer_norm_epsilon must be > 0, got {layer_norm_epsilon}")
        act_parts = str(feed_forward_proj).split("-")
        if (
            len(act_parts) > 2
            or (len(act_parts) == 2 and act_parts[0] != "gated")
            or act_parts[-1] not in FEED_FORWARD_ACTIVATIONS
        ):
            raise ValueError(
                f"feed_forward_proj {feed_forward_proj!r} is not valid: use 'relu' (T5), 'gated-gelu' (T5 v1.1), "
                f"or '[gated-]ACT' with ACT in {FEED_FORWARD_ACTIVATIONS}"
            )
        if box_area not in BOX_AREA_MODES:
            raise ValueError(
                f"box_area must be one of {BOX_AREA_MODES} ('vl_t5' reproduces the original code's area quirk), "
                f"got {box_area!r}"
            )
        if adapter_reduction_factor is not None and d_model // adapter_reduction_factor < 1:
            raise ValueError(
                f"adapter_reduction_factor {adapter_reduction_factor} leaves no adapter units for d_model {d_model}"
            )
        if vision_feature_select not in VISION_FEATURE_SELECTS:
            raise ValueError(f"vision_feature_select must be one of {VISION_FEATURE_SELECTS}, got {vision_feature_select!r}")
        if vision_box_mode not in VISION_BOX_MODES:
            raise ValueError(f"vision_box_mode must be one of {VISION_BOX_MODES}, got {vision_box_mode!r}")
        if vision_tower_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(
                f"vision_tower_dtype must be None, 'float32', 'float16' or 'bfloat16', got {vision_tower_dtype!r}"
            )
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)) or not logit_scale > 0:
            raise ValueError(f"logit_scale must be a positive number (1 / temperature), got {logit_scale!r}")
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id must be an id in [0, vocab_size={vocab_size}), got {pad_token_id!r}")
        if text_prefix is not None and not isinstance(text_prefix, str):
            raise ValueError(f"text_prefix must be a string (e.g. 'vqa: ') or None, got {type(text_prefix).__name__}")

        if isinstance(vision_config, dict):
            from transformers import CONFIG_MAPPING

            vision_config = dict(vision_config)
            vision_model_type = vision_config.pop("model_type", "clip_vision_model")
            if vision_model_type == "clip_resnet_vision_model":  # the OpenAI CLIP ResNet (VL-Adapter's RN101 grids)
                from .clip_resnet import CLIPResNetVisionConfig

                vision_config.pop("auto_map", None)
                vision_config = CLIPResNetVisionConfig(**vision_config)
            elif vision_model_type not in CONFIG_MAPPING:
                raise ValueError(
                    f"vision_config has model_type {vision_model_type!r}, unknown to this transformers version"
                )
            else:
                vision_config = CONFIG_MAPPING[vision_model_type](**vision_config)
        elif vision_config is not None and not isinstance(vision_config, PreTrainedConfig):
            raise ValueError(
                f"vision_config must be a transformers config (e.g. CLIPVisionConfig) or a dict, got "
                f"{type(vision_config).__name__}"
            )
        if vision_config is not None:
            if vision_config.hidden_size != feat_dim:
                raise ValueError(
                    f"feat_dim ({feat_dim}) must equal the vision tower's hidden_size ({vision_config.hidden_size}): "
                    f"the tower's patch tokens are the visual features"
                )
            n_tower_layers = vision_config.num_hidden_layers
            if not -(n_tower_layers + 1) <= vision_feature_layer <= n_tower_layers:
                raise ValueError(
                    f"vision_feature_layer {vision_feature_layer} is out of range for a tower with "
                    f"{n_tower_layers} layers (hidden states are indexed 0..{n_tower_layers}, or negative)"
                )

        self.backbone = backbone
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.d_kv = d_kv
        self.d_ff = d_ff
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.max_position_embeddings = max_position_embeddings
        self.scale_embedding = bool(scale_embedding)
        self.share_vis_lang_layer_norm = bool(share_vis_lang_layer_norm)
        self.dropout_rate = float(dropout_rate)
        self.attention_dropout = None if attention_dropout is None else float(attention_dropout)
        self.activation_dropout = None if activation_dropout is None else float(activation_dropout)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.initializer_factor = float(initializer_factor)
        self.feed_forward_proj = feed_forward_proj
        self.feat_dim = feat_dim
        self.pos_dim = pos_dim
        self.n_images = n_images
        self.use_vis_order_embedding = bool(use_vis_order_embedding)
        self.use_vis_layer_norm = bool(use_vis_layer_norm)
        self.individual_vis_layer_norm = bool(individual_vis_layer_norm)
        self.box_area = box_area
        self.visual_downsample_size = visual_downsample_size
        self.adapter_reduction_factor = adapter_reduction_factor
        self.adapter_act = adapter_act
        self.vision_config = vision_config
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select = vision_feature_select
        self.vision_grid_pool_size = vision_grid_pool_size
        self.vision_box_mode = vision_box_mode
        self.vision_tower_dtype = vision_tower_dtype
        self.text_prefix = text_prefix
        self.pooling = pooling
        self.projection_dim = projection_dim
        self.normalize = bool(normalize)
        self.similarity = similarity
        self.logit_scale = float(logit_scale)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        act = self.feed_forward_proj.split("-")[-1]
        # T5 v1.1 ("gated-gelu") uses the tanh approximation, as transformers' T5Config maps it.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @property
    def embedding_dim(self) -> int:
        """Size of `pooler_output`, the retrieval embedding."""
        return self.projection_dim or self.d_model


__all__ = ["JointEncoderConfig"]
