"""Configuration of the VL-T5 joint encoder (text + visual tokens through T5 encoder blocks) used as a retriever."""

from __future__ import annotations

from transformers import PreTrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

POOLING_MODES = ("mean", "text_mean", "visual_mean", "first")
SIMILARITIES = ("dot", "cosine")
BOX_AREA_MODES = ("vl_t5", "xyxy")
VISION_FEATURE_SELECTS = ("patch", "cls_patch")
VISION_BOX_MODES = ("grid", "zeros")
FEED_FORWARD_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu")


class JointEncoderConfig(PreTrainedConfig):
    r"""
    Configuration of a [`JointEncoderModel`]: the encoder of VL-T5 (Cho et al., 2021) / VL-Adapter (Sung et al., 2022)
    with a retrieval head. Text field names follow transformers' `T5Config`; visual field names follow VL-T5.
    The defaults are those of the released VL-T5 (t5-base) checkpoints, with a cosine-similarity retrieval head.

    Text encoder (as in `T5Config`):
        vocab_size (`int`, defaults to 32200): 32000 sentencepiece pieces + 100 `<extra_id_*>` + 100
            `<vis_extra_id_*>`. The last rows double as the object-order embedding (`<vis_extra_id_k>` = vocab_size-1-k).
        d_model (`int`, defaults to 768): hidden size.
        d_kv (`int`, defaults to 64): size of each attention head.
        d_ff (`int`, defaults to 3072): inner size of the feed-forward layer.
        num_layers (`int`, defaults to 12): number of T5 blocks.
        num_heads (`int`, defaults to 12): attention heads per block.
        relative_attention_num_buckets (`int`, defaults to 32) / relative_attention_max_distance (`int`, 128):
            T5 relative position buckets (bidirectional), applied to text x text pairs only.
        dropout_rate (`float`, defaults to 0.1): dropout everywhere T5 applies it (train mode only).
        layer_norm_epsilon (`float`, defaults to 1e-6): epsilon of every RMS norm.
        initializer_factor (`float`, defaults to 1.0): T5's weight-init scale.
        feed_forward_proj (`str`, defaults to `"relu"`): `"relu"` (T5) or `"gated-gelu"` (T5 v1.1) or
            `"gated-{act}"`/`"{act}"` with act in relu, gelu, gelu_new, gelu_pytorch_tanh, silu.
        pad_token_id (`int`, defaults to 0), eos_token_id (`int`, defaults to 1).

    Visual embedding (as in the VL-T5 spec):
        feat_dim (`int`, defaults to 2048): size of each visual feature (Faster R-CNN 2048, CLIP RN101 grid 2048).
        pos_dim (`int`, defaults to 4): box coordinates (x1, y1, x2, y2) in [0, 1]; the area is appended.
        n_images (`int`, defaults to 2): rows of the image-order embedding (images per query).
        use_vis_order_embedding (`bool`, defaults to True): add image-order and object-order embeddings.
        use_vis_layer_norm (`bool`, defaults to True): RMS norms in the visual embedding.
        individual_vis_layer_norm (`bool`, defaults to True): one norm after each projection (VL-T5) rather than one
            norm after the sum (VL-BART style).
        box_area (`str`, defaults to `"vl_t5"`): `"vl_t5"` reproduces VL-T5's area quirk `(y2 - x2) * (y1 - x1)` that
            released checkpoints were trained with; `"xyxy"` uses the true area `(x2 - x1) * (y2 - y1)`.
        visual_downsample_size (`int`, *optional*): if set (VL-Adapter: 6), a square grid of visual tokens
            (e.g. 7x7 = 49) is adaptive-max-pooled to `size x size` tokens before embedding; boxes, masks and order
            ids are cut to the first `size**2` tokens.
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
        vocab_size: int = 32200,
        d_model: int = 768,
        d_kv: int = 64,
        d_ff: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        relative_attention_num_buckets: int = 32,
        relative_attention_max_distance: int = 128,
        dropout_rate: float = 0.1,
        layer_norm_epsilon: float = 1e-6,
        initializer_factor: float = 1.0,
        feed_forward_proj: str = "relu",
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
        pad_token_id: int = 0,
        eos_token_id: int = 1,
        **kwargs,
    ):
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
            ("relative_attention_num_buckets", relative_attention_num_buckets),
            ("relative_attention_max_distance", relative_attention_max_distance),
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
        if relative_attention_num_buckets % 2:
            raise ValueError(
                f"relative_attention_num_buckets must be even (T5 splits buckets between the two directions), "
                f"got {relative_attention_num_buckets}"
            )
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

        if isinstance(vision_config, dict):
            from transformers import CONFIG_MAPPING

            vision_config = dict(vision_config)
            vision_model_type = vision_config.pop("model_type", "clip_vision_model")
            if vision_model_type not in CONFIG_MAPPING:
                raise ValueError(
                    f"vision_config has model_type {vision_model_type!r}, unknown to this transformers version"
                )
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

        self.vocab_size = vocab_size
        self.d_model = d_model
        self.d_kv = d_kv
        self.d_ff = d_ff
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.dropout_rate = float(dropout_rate)
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
