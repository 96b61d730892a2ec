"""Encoding a KB into shards: equals the model run passage by passage, resumes to identical bits, 2 processes = 1."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import randomize_, tiny_config_kwargs
from safetensors.torch import load_file

from vl_joint_encoder import JointEncoderConfig, JointEncoderModel
from vl_joint_encoder.retrieval import encode
from vl_joint_encoder.retrieval.store import EmbeddingStore
from vl_joint_encoder.tokenization_joint_encoder import train_vl_t5_tokenizer


WORDS = "the a tower bridge river castle painter born city museum song king queen war built year north old".split()


def make_kb(n=90, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(2, 30, (1,), generator=generator))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (length,), generator=generator)]
        rows.append({"id": f"p{i}", "text": " ".join(words)})
    return rows


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny random JointEncoderModel + trained tokenizer saved like a real checkpoint."""
    tokenizer = train_vl_t5_tokenizer([r["text"] for r in make_kb()] * 2, vocab_size=40)
    torch.manual_seed(0)
    model = randomize_(JointEncoderModel(JointEncoderConfig(**tiny_config_kwargs(vocab_size=len(tokenizer))))).eval()
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), model, tokenizer


def run_encode(saved_model, kb, output_dir, **kwargs):
    _, model, tokenizer = saved_model
    kwargs = {"batch_size": 8, "shard_size": 20, "max_length": 512, "progress": False, **kwargs}
    return encode.encode_knowledge_base(model, tokenizer, kb, output_dir, **kwargs)


def read_dir(directory):
    """Every shard's tensors, ids and manifest: what "identical result" means."""
    shards = {}
    for name in sorted(os.listdir(os.path.join(directory, "shards"))):
        shards[name] = load_file(os.path.join(directory, "shards", name))
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(directory, "ids.json")) as f:
        ids = json.load(f)
    return shards, ids, manifest


@torch.no_grad()
def test_embeddings_equal_model_passage_by_passage(saved_model, tmp_path):
    _, model, tokenizer = saved_model
    kb = make_kb()
    manifest = run_encode(saved_model, kb, tmp_path / "out")
    assert manifest["count"] == len(kb) and manifest["dim"] == 32 and manifest["similarity"] == "cosine"
    assert len(manifest["shards"]) == 5
    store = EmbeddingStore(tmp_path / "out", verify=True)
    assert store.ids == [r["id"] for r in kb]
    embeddings, positions = store.load_all()
    assert positions.tolist() == list(range(len(kb)))
    for row in (0, 17, 45, 89):  # reference: one passage alone, no padding, plain forward + L2 norm
        inputs = tokenizer([kb[row]["text"]], return_tensors="pt")
        expected = torch.nn.functional.normalize(model(**inputs).pooler_output, dim=-1)[0]
        torch.testing.assert_close(embeddings[row], expected, atol=1e-5, rtol=1e-5)
    # layout: shard s holds the contiguous rows [20 s, 20 s + 20), longest text first, equal lengths in row order
    for shard in range(5):
        positions = load_file(tmp_path / "out" / "shards" / f"shard-{shard:05d}.safetensors")["positions"].tolist()
        rows = range(20 * shard, min(20 * shard + 20, len(kb)))
        assert positions == sorted(rows, key=lambda r: (-len(kb[r]["text"]), r))


def test_resume_after_crash_is_identical(saved_model, tmp_path, monkeypatch):
    kb = make_kb()
    run_encode(saved_model, kb, tmp_path / "reference")
    written = []
    original = encode.write_shard

    def crash_after_two(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")
        written.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(encode, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_encode(saved_model, kb, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    with pytest.raises(ValueError, match="unfinished"):
        EmbeddingStore(tmp_path / "resumed")
    # a half-written shard file (killed mid-write without os.replace) is not taken for a complete one
    (tmp_path / "resumed" / "shards" / "shard-00002.safetensors").write_bytes(b"\x00" * 10)
    monkeypatch.setattr(encode, "write_shard", original)
    resumed_writes = []
    monkeypatch.setattr(encode, "write_shard", lambda *a, **k: resumed_writes.append(a[1]) or original(*a, **k))
    run_encode(saved_model, kb, tmp_path / "resumed")
    assert resumed_writes == [2, 3, 4]
    ref_shards, ref_ids, ref_manifest = read_dir(tmp_path / "reference")
    shards, ids, manifest = read_dir(tmp_path / "resumed")
    assert ids == ref_ids and manifest == ref_manifest and shards.keys() == ref_shards.keys()
    for name in shards:
        for key in ("embeddings", "positions"):
            assert torch.equal(shards[name][key], ref_shards[name][key]), (name, key)


def test_bad_inputs(saved_model, tmp_path):
    with pytest.raises(ValueError, match="the KB is empty"):
        run_encode(saved_model, [], tmp_path / "empty")
    kb = make_kb(30)
    duplicated = kb + [dict(kb[3]), dict(kb[7])]
    with pytest.raises(ValueError, match="2 duplicate passage ids, e.g. 'p3', 'p7'"):
        run_encode(saved_model, duplicated, tmp_path / "dup")
    with pytest.raises(ValueError, match="lacks column"):
        run_encode(saved_model, [{"id": "a", "passage": "x"}], tmp_path / "cols")
    run_encode(saved_model, kb, tmp_path / "kb")
    changed = [dict(r) for r in kb]
    changed[5]["text"] += " castle"
    with pytest.raises(ValueError, match="KB changed since encoding"):
        run_encode(saved_model, changed, tmp_path / "kb")
    with pytest.raises(ValueError, match="the KB has 29 passages"):
        run_encode(saved_model, kb[:-1], tmp_path / "kb")
    with pytest.raises(ValueError, match="changed since it was encoded"):
        encode.check_knowledge_base(tmp_path / "kb", changed)
    encode.check_knowledge_base(tmp_path / "kb", kb)
    # shards from another model mixed into the directory
    _, model, tokenizer = saved_model
    other = JointEncoderModel(model.config).eval()
    encode.encode_knowledge_base(other, tokenizer, kb, tmp_path / "other", batch_size=8, shard_size=20, progress=False)
    shutil.copy(tmp_path / "other/shards/shard-00001.safetensors", tmp_path / "kb/shards/shard-00009.safetensors")
    with pytest.raises(ValueError, match="mixes shards from different models"):
        EmbeddingStore(tmp_path / "kb")
    with pytest.raises(ValueError, match="weights differ"):
        encode.encode_knowledge_base(
            other, tokenizer, kb, tmp_path / "kb", batch_size=8, shard_size=20, progress=False
        )
    # a corrupted shard is caught on load
    os.remove(tmp_path / "kb/shards/shard-00009.safetensors")
    path = tmp_path / "kb/shards/shard-00000.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        list(EmbeddingStore(tmp_path / "kb", verify=True).chunks())


@pytest.mark.slow
def test_two_process_accelerate_launch_equals_one_process(saved_model, tmp_path):
    pytest.importorskip("accelerate")
    model_path, _, _ = saved_model
    kb = make_kb()
    with open(tmp_path / "kb.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kb)
    # bitwise equality is the claim, so both runs use one thread per process: a CPU matmul's reduction order (and so
    # its last bits) depends on how many threads split it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_encode(saved_model, kb, tmp_path / "one", model_name=model_path)
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vl_joint_encoder", "encode", "--cpu",
        "--model", model_path, "--kb", str(tmp_path / "kb.jsonl"), "--output_dir", str(tmp_path / "two"),
        "--batch_size", "8", "--shard_size", "20", "--max_length", "512",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, one_ids, one_manifest = read_dir(tmp_path / "one")
    two, two_ids, two_manifest = read_dir(tmp_path / "two")
    assert one_ids == two_ids and one_manifest == two_manifest
    for name in one:
        assert torch.equal(one[name]["embeddings"], two[name]["embeddings"]), name
        assert torch.equal(one[name]["positions"], two[name]["positions"]), name


def tower_model_and_photos(tokenizer, folder, names=("astronaut", "coffee", "chelsea")):
    """A tiny random model with a frozen CLIP tower, its processor, and real photos (scikit-image) saved as PNG files
    in `folder`: (model, processor, paths)."""
    from PIL import Image
    from skimage import data as skdata

    from vl_joint_encoder import JointEncoderProcessor
    from vl_joint_encoder.vision import tiny_clip_vision_config

    vision_config = tiny_clip_vision_config()
    torch.manual_seed(0)
    config = JointEncoderConfig(
        **tiny_config_kwargs(vocab_size=len(tokenizer), feat_dim=vision_config.hidden_size),
        vision_config=vision_config,
    )
    model = randomize_(JointEncoderModel(config)).eval()
    processor = JointEncoderProcessor.from_model_config(config, tokenizer)
    paths = []
    for name in names:
        paths.append(str(folder / f"{name}.png"))
        Image.fromarray(getattr(skdata, name)()).save(paths[-1])
    return model, processor, paths


@torch.no_grad()
def test_passages_with_images_through_the_processor(saved_model, tmp_path):
    """Image passages (real photos, as files) go through JointEncoderProcessor and the frozen vision tower."""
    from PIL import Image

    _, _, tokenizer = saved_model
    model, processor, paths = tower_model_and_photos(tokenizer, tmp_path)
    kb = [{"id": f"p{i}", "text": r["text"], "image": paths[i % 3]} for i, r in enumerate(make_kb(7))]
    encode.encode_knowledge_base(model, processor, kb, tmp_path / "out", batch_size=4, shard_size=5, progress=False)
    embeddings, _ = EmbeddingStore(tmp_path / "out").load_all()
    for row in (0, 4):
        inputs = processor(text=[kb[row]["text"]], images=[Image.open(kb[row]["image"])], return_tensors="pt")
        expected = torch.nn.functional.normalize(model(**inputs).pooler_output, dim=-1)[0]
        torch.testing.assert_close(embeddings[row], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="plain tokenizer"):
        encode.encode_knowledge_base(model, tokenizer, kb, tmp_path / "tok", progress=False)


def test_image_cache_gives_the_same_bits_as_decoding_every_passage(saved_model, tmp_path):
    """Passages sharing an image file (an article's image): decoded once per shard or once per passage, the shards are
    bit-identical."""
    _, _, tokenizer = saved_model
    model, processor, _ = tower_model_and_photos(tokenizer, tmp_path)
    names = ["astronaut", "coffee", "chelsea"]
    kb = [{"id": f"p{i}", "text": r["text"], "image": f"{names[i // 4 % 3]}.png"} for i, r in enumerate(make_kb(16))]
    for cache, out in ((True, "cached"), (False, "uncached")):
        encode.encode_knowledge_base(model, processor, kb, tmp_path / out, batch_size=3, shard_size=8, progress=False,
                                     image_root=str(tmp_path), cache_images=cache)  # fmt: skip
    cached, _, cached_manifest = read_dir(tmp_path / "cached")
    uncached, _, uncached_manifest = read_dir(tmp_path / "uncached")
    assert cached.keys() == uncached.keys() and cached_manifest == uncached_manifest
    for name in cached:
        assert torch.equal(cached[name]["embeddings"], uncached[name]["embeddings"]), name
