"""Robust image loading on real photos (skimage, scikit-learn) in every mode, with bad files."""

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from sklearn.datasets import load_sample_images

from vl_joint_encoder.images import ImageLoadError, list_image_files, load_image, load_images


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(load_sample_images().images[0])  # china.jpg, 427 x 640


def test_modes_converted_to_rgb(photo, tmp_path):
    gray = Image.fromarray(skdata.camera())  # 8-bit grayscale
    out = np.asarray(load_image(gray))
    assert out.shape == (512, 512, 3) and (out[..., 0] == np.asarray(gray)).all() and (out[..., 2] == out[..., 0]).all()
    # 16-bit: value v -> round(v / 65535 * 255)
    values = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    image16 = Image.fromarray(values.astype(np.int32), mode="I").convert("I;16")
    image16.save(tmp_path / "depth.png")
    assert np.asarray(load_image(tmp_path / "depth.png"))[0, :, 0].tolist() == [0, 1, 255, 128]
    # RGBA: half-transparent red on white -> (255, 128, 128) (alpha compositing by hand)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 127, 127]
    # palette (GIF) and CMYK (JPEG) from the real photo
    photo.convert("P").save(tmp_path / "china.gif")
    photo.convert("CMYK").save(tmp_path / "china_cmyk.jpg")
    for name in ("china.gif", "china_cmyk.jpg"):
        loaded = load_image(tmp_path / name)
        assert loaded.mode == "RGB" and loaded.size == photo.size
        assert np.abs(np.asarray(loaded, float) - np.asarray(photo, float)).mean() < 20  # same picture
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # index 0 transparent -> white
    assert np.asarray(load_image(palette))[0].tolist() == [[255, 255, 255], [10, 20, 30]]
    assert np.asarray(load_image(np.asarray(photo).transpose(2, 0, 1))).shape == (427, 640, 3)  # (C, H, W) array


def test_exif_orientation_applied(photo, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    photo.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.size == (427, 640)  # width and height swapped
    assert load_image(tmp_path / "rotated.jpg", exif_transpose=False).size == (640, 427)


def test_large_images_guarded_and_downscaled(tmp_path):
    big = Image.new("RGB", (3000, 2000), (10, 200, 30))
    big.save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png").size == (2048, 1365)  # long side capped, aspect kept
    assert load_image(tmp_path / "big.png", max_side=None).size == (3000, 2000)
    with pytest.raises(ImageLoadError, match=r"big.png.*6,000,000 pixels is above max_pixels=1,000,000"):
        load_image(tmp_path / "big.png", max_pixels=1_000_000)
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1_000_000  # PIL would raise DecompressionBombError (> 2x its limit)
    try:
        assert load_image(tmp_path / "big.png", max_side=512).size == (512, 341)
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    assert Image.MAX_IMAGE_PIXELS == previous


def test_bad_files_named_and_skippable(photo, tmp_path):
    photo.save(tmp_path / "good.jpg")
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    with pytest.raises(ImageLoadError, match="missing.jpg.*file not found"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageLoadError, match="garbage.jpg.*not a recognised image"):
        load_image(tmp_path / "garbage.jpg")
    with pytest.raises(ImageLoadError, match="truncated.jpg.*truncated"):
        load_image(tmp_path / "truncated.jpg")
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(ImageLoadError, match="NaN"):
        load_image(np.full((4, 4, 3), np.nan))
    sources = [tmp_path / "good.jpg", tmp_path / "garbage.jpg", tmp_path / "missing.jpg"]
    images, failures = load_images(sources, on_error="skip")
    assert images[0].size == photo.size and images[1] is None and images[2] is None
    assert [(f.index, f.source.endswith(name)) for f, name in zip(failures, ["garbage.jpg", "missing.jpg"])] == [
        (1, True),
        (2, True),
    ]
    with pytest.raises(ImageLoadError, match="garbage.jpg"):
        load_images(sources)
    assert [p.rsplit("/", 1)[1] for p in list_image_files(tmp_path)] == ["garbage.jpg", "good.jpg", "truncated.jpg"]
    with pytest.raises(ValueError, match="does not exist"):
        list_image_files(tmp_path / "nope")
