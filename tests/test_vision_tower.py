"""The frozen vision tower inside the joint encoder: equivalence with precomputed features, freezing, attaching CLIP."""

import numpy as np
import pytest
import torch
from conftest import randomize_, tiny_config_kwargs
from PIL import Image
from skimage import data as skdata
from transformers import AutoModel, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPVisionModel, SiglipVisionModel

from vl_joint_encoder import JointEncoderConfig, JointEncoderModel, JointEncoderProcessor
from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer
from vl_joint_encoder.vision import (
    attach_vision_tower,
    processor_for_tower,
    tiny_clip_vision_config,
    tiny_siglip_vision_config,
)


ATOL = 1e-5
TEXTS = ["who is the astronaut", "what is in the cup", "which animal is this", "a rocket on its pad"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_vl_t5_tokenizer(TEXTS * 20, vocab_size=60)


@pytest.fixture(scope="module")
def photos():
    return [Image.fromarray(image) for image in (skdata.astronaut(), skdata.coffee(), skdata.chelsea())]


def build(tokenizer, vision_config=None, seed=0, **overrides):
    vision_config = vision_config if vision_config is not None else tiny_clip_vision_config()
    torch.manual_seed(seed)
    config = JointEncoderConfig(
        **tiny_config_kwargs(vocab_size=len(tokenizer), feat_dim=vision_config.hidden_size, **overrides),
        vision_config=vision_config,
    )
    model = JointEncoderModel(config)
    randomize_(model, seed=seed)  # the tower too: no weight is at its (often symmetric) initial value
    return model.eval()


def hand_grid_boxes(grid):
    """Cell (row r, column c) of a grid x grid split of the image: (c/g, r/g, (c+1)/g, (r+1)/g)."""
    return np.array([[c / grid, r / grid, (c + 1) / grid, (r + 1) / grid] for r in range(grid) for c in range(grid)])


def reference_tower_tokens(model, pixel_values, tower_class=CLIPVisionModel, layer=-1):
    """The tower's tokens computed by a separate transformers vision model holding the same weights."""
    tower = tower_class(model.config.vision_config).eval()
    tower.load_state_dict(model.vision_model.state_dict())
    with torch.no_grad():
        return tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer]  # (N, T, C)


def processor_for(tokenizer, model):
    return JointEncoderProcessor.from_model_config(model.config, tokenizer)


@pytest.mark.parametrize(
    "overrides, grid, select",
    [
        (dict(), 4, "patch"),
        (dict(vision_feature_select="cls_patch", vision_feature_layer=-2), 4, "cls_patch"),
        (dict(vision_grid_pool_size=2, vision_box_mode="zeros"), 2, "patch"),
    ],
)
def test_tower_path_equals_precomputed_path(tokenizer, photos, overrides, grid, select):
    model = build(tokenizer, **overrides)
    processor = processor_for(tokenizer, model)
    images = [[photos[0], photos[1]], [photos[2]]]  # several images for the first query, one for the second
    pixel_batch = processor(text=TEXTS[:2], images=images)
    assert pixel_batch["pixel_values"].shape == (2, 2, 3, 32, 32)
    with torch.no_grad():
        tower_embedding = model(**pixel_batch).pooler_output

    # independent reference: transformers' CLIPVisionModel tokens, CLS / pooling / boxes done by hand
    flat = pixel_batch["pixel_values"].flatten(0, 1)  # (4, 3, 32, 32); the last image is padding
    tokens = reference_tower_tokens(model, flat, layer=model.config.vision_feature_layer).numpy()  # (4, 17, 32)
    patches = tokens[:, 1:]
    if grid == 2:  # average of each 2 x 2 block of the 4 x 4 grid
        patches = patches.reshape(4, 2, 2, 2, 2, 32).mean(axis=(2, 4)).reshape(4, 4, 32)
    boxes = hand_grid_boxes(grid)
    if select == "cls_patch":
        patches = np.concatenate([tokens[:, :1], patches], axis=1)
        boxes = np.concatenate([[[0.0, 0.0, 1.0, 1.0]], boxes])
    if model.config.vision_box_mode == "zeros":
        boxes = np.zeros_like(boxes)
    feats = [[patches[0], patches[1]], patches[2]]
    feature_batch = processor(
        text=TEXTS[:2], visual_feats=feats, boxes=[[boxes, boxes], boxes], image_size=None
    )
    with torch.no_grad():
        feature_embedding = model(**feature_batch).pooler_output
    torch.testing.assert_close(tower_embedding, feature_embedding, atol=ATOL, rtol=0)
    # and the features the model computes itself are the reference ones
    inside = model.get_image_features(pixel_batch["pixel_values"], pixel_batch["pixel_attention_mask"])
    per_image = boxes.shape[0]
    torch.testing.assert_close(inside["visual_feats"][0], torch.from_numpy(patches[:2].reshape(-1, 32)), atol=ATOL,
                               rtol=0)
    assert inside["image_order_ids"][0].tolist() == [0] * per_image + [1] * per_image
    assert inside["visual_attention_mask"][1].tolist() == [1] * per_image + [0] * per_image
    torch.testing.assert_close(inside["visual_pos"][0, :per_image], torch.from_numpy(boxes).float())


def test_freezing_holds_through_an_optimizer_step(tokenizer, photos):
    model = build(tokenizer, dropout_rate=0.1)
    processor = processor_for(tokenizer, model)
    tower_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    rest_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("vision_model.")}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all parameters, on purpose
    model.train()
    assert model.training and not model.vision_model.training
    assert not any(m.training for m in model.vision_model.modules())
    assert all(not p.requires_grad for p in model.vision_model.parameters())
    batch = processor(text=TEXTS[:3], images=photos)
    for _ in range(2):
        embeddings = model(**batch).pooler_output  # (3, 32)
        loss = -torch.log_softmax(embeddings @ embeddings.T * 5, dim=-1).diagonal().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None for p in model.vision_model.parameters())
    for key, value in model.vision_model.state_dict().items():
        assert torch.equal(value, tower_before[key]), key
    changed = [k for k, v in model.state_dict().items() if k in rest_before and not torch.equal(v, rest_before[k])]
    assert "visual_embedding.feat_embedding.0.weight" in changed and len(changed) > 10


def test_siglip_tower_has_no_cls_token(tokenizer, photos):
    model = build(tokenizer, vision_config=tiny_siglip_vision_config())
    processor = processor_for(tokenizer, model)
    assert type(model.vision_model).__name__ == "SiglipVisionModel"
    assert type(processor.image_processor).__name__ == "SiglipImageProcessorPil"
    batch = processor(text=TEXTS[:1], images=[photos[0]])
    inside = model.get_image_features(batch["pixel_values"])
    reference = reference_tower_tokens(model, batch["pixel_values"][:, 0], tower_class=SiglipVisionModel)  # (1, 16, 32)
    assert reference.shape[1] == 16  # 4 x 4 patches, no CLS
    torch.testing.assert_close(inside["visual_feats"], reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(inside["visual_pos"][0], torch.from_numpy(hand_grid_boxes(4)).float())
    with torch.no_grad():
        tower_embedding = model(**batch).pooler_output
        feature_embedding = model(**processor(text=TEXTS[:1], visual_feats=[reference[0]],
                                              boxes=[hand_grid_boxes(4)])).pooler_output
    torch.testing.assert_close(tower_embedding, feature_embedding, atol=ATOL, rtol=0)
    cls_model = build(tokenizer, vision_config=tiny_siglip_vision_config(), vision_feature_select="cls_patch")
    with pytest.raises(ValueError, match="no CLS token"):
        cls_model(**batch)


def test_vision_tower_dtype_bfloat16(tokenizer, photos):
    model = build(tokenizer, vision_tower_dtype="bfloat16")
    processor = processor_for(tokenizer, model)
    batch = processor(text=TEXTS[:1], images=[photos[1]])
    reference = reference_tower_tokens(model, batch["pixel_values"][:, 0])[:, 1:]  # fp32 tower
    inside = model.get_image_features(batch["pixel_values"])
    assert next(model.vision_model.parameters()).dtype == torch.bfloat16
    assert next(model.block.parameters()).dtype == torch.float32 and inside["visual_feats"].dtype == torch.float32
    torch.testing.assert_close(inside["visual_feats"], reference, atol=0.1, rtol=0.05)  # bf16 has 8 mantissa bits


def test_attach_clip_checkpoint_and_round_trip(tokenizer, photos, tmp_path):
    clip_config = CLIPConfig(
        text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                         vocab_size=50, max_position_embeddings=16),
        vision_config=tiny_clip_vision_config().to_dict(),
        projection_dim=8,
    )
    torch.manual_seed(1)
    clip = CLIPModel(clip_config).eval()
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    text_only = randomize_(JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer),
                                                                                    feat_dim=32))))
    model = attach_vision_tower(text_only, tmp_path / "clip", vision_feature_layer=-2)
    assert model.config.vision_feature_layer == -2 and model.config.vision_config.model_type == "clip_vision_model"
    for key, value in clip.vision_model.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[key], value), key
    for key, value in text_only.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(not p.requires_grad for p in model.vision_model.parameters())

    processor = processor_for_tower(model, tokenizer, tmp_path / "clip")
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    batch = processor(text=TEXTS[:2], images=[photos[0], photos[2]])
    with torch.no_grad():
        expected = model(**batch).pooler_output
    model.save_pretrained(tmp_path / "pipeline")
    processor.save_pretrained(tmp_path / "pipeline")
    reloaded = AutoModel.from_pretrained(tmp_path / "pipeline")
    assert not reloaded.training and not reloaded.vision_model.training
    assert all(not p.requires_grad for p in reloaded.vision_model.parameters())
    reloaded_processor = JointEncoderProcessor.from_pretrained(tmp_path / "pipeline")
    with torch.no_grad():
        again = reloaded(**reloaded_processor(text=TEXTS[:2], images=[photos[0], photos[2]])).pooler_output
    torch.testing.assert_close(again, expected, atol=ATOL, rtol=0)

    with pytest.raises(ValueError, match="feat_dim=16"):
        attach_vision_tower(JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs())), tmp_path / "clip")
    widened = attach_vision_tower(JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs())), tmp_path / "clip",
                                  reinit_feat_embedding=True)
    assert widened.visual_embedding.feat_embedding[0].weight.shape == (32, 32)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="'bert' checkpoint"):
        attach_vision_tower(text_only, tmp_path / "bert")
