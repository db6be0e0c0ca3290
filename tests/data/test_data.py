"""data/: finding, decoding, caching, batching and writing images."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flexvae.data import (
    IMAGE_EXTENSIONS,
    Batch,
    ImageFolder,
    SkipLog,
    TorchvisionImages,
    collate,
    find_images,
    load_image,
    make_loader,
    open_dataset,
    pil_to_tensor,
    sample_images,
    save_grid,
    save_image,
)
from flexvae.errors import DataError


def noise(size=(24, 16), mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(mode) if mode != "L" else 1
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode)


def half_white(size=16) -> Image.Image:
    """Grey image whose left half is white and right half black."""
    array = np.zeros((size, size), dtype=np.uint8)
    array[:, : size // 2] = 255
    return Image.fromarray(array)


def truncated(path: Path, fmt: str) -> Path:
    noise((32, 32)).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Two good images, a truncated PNG and a text file named like a PNG."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    noise(seed=1).save(root / "a.png")
    noise(seed=2).save(root / "sub" / "b.jpg")
    truncated(root / "c_trunc.png", "PNG")
    (root / "d_text.png").write_text("this is not an image")
    return root


def _palette_with_transparency() -> Image.Image:
    img = noise(mode="RGB").quantize(colors=8)
    img.info["transparency"] = 0
    return img


MODE_FILES = {
    "RGB": (lambda: noise(mode="RGB"), "png"),
    "L": (lambda: noise(mode="L"), "png"),
    "LA": (lambda: noise(mode="RGBA").convert("LA"), "png"),
    "RGBA": (lambda: noise(mode="RGBA"), "png"),
    "P": (_palette_with_transparency, "png"),
    "CMYK": (lambda: noise(mode="RGB").convert("CMYK"), "tiff"),
    "I;16": (lambda: Image.fromarray(np.full((16, 24), 40000, dtype=np.uint16)), "png"),
}


def _write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's IDX format: big-endian magic (0, 0, 8 = uint8, ndim), dims, data."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist(root: Path) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, count in [("train", 5), ("t10k", 3)]:
        images = np.zeros((count, 28, 28), dtype=np.uint8)
        for i in range(count):
            images[i, :, : 4 * (i + 1)] = 255  # image i: a white band 4(i+1) px wide
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10)


def _offline(monkeypatch):
    """Make every MNIST fetch fail as it does without a network."""
    from urllib.error import URLError

    import torchvision.datasets.mnist

    def refuse(url, *args, **kwargs):
        raise URLError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", refuse)


# ------------------------------------------------------------------ decoded-image cache
def _photo_folder(tmp_path, n=10):
    rng = np.random.default_rng(5)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_text("not an image")
    return tmp_path


def test_find_images_recursive_mixed_case_skips_hidden_and_non_images(tmp_path):
    deep = tmp_path / "one" / "two" / "three"
    deep.mkdir(parents=True)
    noise().save(tmp_path / "top.PNG", format="PNG")
    noise().save(deep / "deep.JpG", format="JPEG")
    noise().save(tmp_path / "one" / "mid.webp", format="WEBP")
    (tmp_path / "one" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    noise().save(tmp_path / ".hidden" / "h.png")
    noise().save(tmp_path / "one" / ".dot.png")

    found = find_images(tmp_path)
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == ["one/mid.webp", "one/two/three/deep.JpG", "top.PNG"]
    assert found == sorted(found)
    assert all(isinstance(p, Path) for p in found)


def test_find_images_missing_folder_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as info:
        find_images(missing)
    assert str(missing) in str(info.value)


def test_find_images_file_and_empty_folder(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        find_images(tmp_path / "f.txt")
    with pytest.raises(DataError, match="no image files") as info:
        find_images(tmp_path)
    assert all(f".{ext}" in str(info.value) for ext in IMAGE_EXTENSIONS)


@pytest.mark.parametrize("mode", list(MODE_FILES))
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_modes_convert_to_any_channel_count(tmp_path, mode, channels):
    make, ext = MODE_FILES[mode]
    path = tmp_path / f"img.{ext}"
    make().save(path)
    with Image.open(path) as check:
        assert check.mode == mode
    image = load_image(path, channels, 12)
    assert image.shape == (channels, 12, 12)
    assert image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    for value, expected in [(65535, 1.0), (0, -1.0), (32768, 0.0)]:
        path = tmp_path / f"v{value}.png"
        Image.fromarray(np.full((16, 16), value, dtype=np.uint16)).save(path)
        image = load_image(path, 1, 16)
        assert torch.allclose(image, torch.full_like(image, expected), atol=0.01), value


def test_other_integer_modes_are_scaled():
    big_endian = Image.fromarray(np.full((8, 8), 65535, dtype=">u2"))
    assert big_endian.mode == "I;16B"
    assert torch.all(pil_to_tensor(big_endian, 1, 8) == 1.0)
    as_int32 = Image.fromarray(np.full((8, 8), 65535, dtype=np.int32))
    assert as_int32.mode == "I"
    assert torch.all(pil_to_tensor(as_int32, 3, 8) == 1.0)


def test_alpha_is_composited_on_black(tmp_path):
    clear, half = tmp_path / "clear.png", tmp_path / "half.png"
    Image.new("RGBA", (16, 16), (255, 255, 255, 0)).save(clear)
    Image.new("RGBA", (16, 16), (255, 255, 255, 128)).save(half)
    assert torch.all(load_image(clear, 3, 8) == -1.0)
    assert torch.all(load_image(clear, 4, 8)[3] == -1.0)
    assert torch.allclose(load_image(half, 1, 8), torch.zeros(1, 8, 8), atol=0.01)
    rgba = load_image(half, 4, 8)
    assert torch.all(rgba[:3] == 1.0) and torch.allclose(rgba[3], torch.zeros(8, 8), atol=0.01)


def test_bad_options_raise(tmp_path):
    path = tmp_path / "a.png"
    noise().save(path)
    with pytest.raises(DataError, match="channels"):
        load_image(path, 2, 8)
    with pytest.raises(DataError, match="nearest") as info:
        load_image(path, 3, 8, resize_filter="bilinar")
    assert "'bilinear'" in str(info.value)
    with pytest.raises(DataError, match="channels"):
        ImageFolder(path.parent, 5, 8)


def test_unreadable_file_raises_data_error_naming_it(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("hello")
    with pytest.raises(DataError, match="x.png"):
        load_image(path, 3, 8)


def test_resize_filters_differ_on_checkerboard(tmp_path):
    board = (np.indices((32, 32)).sum(axis=0) % 2 * 255).astype(np.uint8)
    path = tmp_path / "board.png"
    Image.fromarray(board).save(path)
    nearest = load_image(path, 1, 8, resize_filter="nearest")
    bilinear = load_image(path, 1, 8, resize_filter="bilinear")
    assert set(nearest.unique().tolist()) <= {-1.0, 1.0}
    assert bilinear.abs().max() < 0.1  # averaging the board gives mid-grey
    assert not torch.equal(nearest, bilinear)


def test_center_crop_versus_pad_to_square(tmp_path):
    wide = np.zeros((8, 32), dtype=np.uint8)
    wide[:, 0] = wide[:, -1] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    cropped = load_image(path, 1, 32, resize_filter="nearest")
    assert torch.all(cropped == -1.0)  # the centre square has no white edge columns
    padded = load_image(path, 1, 32, resize_filter="nearest", pad_to_square=True)
    assert torch.all(padded[0, 12:20, 0] == 1.0) and torch.all(padded[0, 12:20, -1] == 1.0)
    assert torch.all(padded[0, :12] == -1.0) and torch.all(padded[0, 20:] == -1.0)


def test_exif_orientation_is_applied(tmp_path):
    img = half_white()
    exif = img.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "rotated.png"
    img.save(path, exif=exif)
    image = load_image(path, 1, 16, resize_filter="nearest")
    assert torch.all(image[0, :8] == 1.0) and torch.all(image[0, 8:] == -1.0)


def test_loading_is_deterministic(tmp_path):
    path = tmp_path / "a.jpg"
    noise((40, 30)).save(path)
    folder = ImageFolder(tmp_path, 3, 16, resize_filter="bicubic")
    assert torch.equal(folder[0]["image"], folder[0]["image"])
    assert torch.equal(folder[0]["image"], load_image(path, 3, 16, resize_filter="bicubic"))


def test_bad_files_reported_in_item_not_raised(tmp_path, mixed_folder):
    truncated(mixed_folder / "e_trunc.jpg", "JPEG")
    folder = ImageFolder(mixed_folder, 3, 16)
    assert folder.relpaths == ["a.png", "c_trunc.png", "d_text.png", "e_trunc.jpg", "sub/b.jpg"]
    assert folder.root == mixed_folder.absolute()
    assert all(p.is_absolute() for p in folder.paths)
    items = [folder[i] for i in range(len(folder))]
    bad = {item["path"]: item for item in items if item["image"] is None}
    assert set(bad) == {"c_trunc.png", "d_text.png", "e_trunc.jpg"}
    assert all(item["error"] and item["index"] == folder.relpaths.index(p) for p, item in bad.items())

    batch = collate(items)
    assert isinstance(batch, Batch)
    assert batch.images.shape == (2, 3, 16, 16)
    assert batch.paths == ["a.png", "sub/b.jpg"] and batch.indices == [0, 4]
    assert [path for path, _ in batch.failures] == ["c_trunc.png", "d_text.png", "e_trunc.jpg"]
    assert collate([bad["d_text.png"]]).images is None


def test_explicit_paths(tmp_path, mixed_folder):
    folder = ImageFolder(mixed_folder, 3, 8, paths=["sub/b.jpg", mixed_folder / "a.png"])
    assert folder.relpaths == ["sub/b.jpg", "a.png"]
    assert folder[0]["image"].shape == (3, 8, 8)


def test_skip_log_warns_once_per_path(capsys):
    log = SkipLog()
    assert log.summary() == "" and log.count == 0
    failures = [("x/a.png", "truncated"), ("b.png", "not an image")]
    for _epoch in range(2):
        log.add(failures)
    messages = capsys.readouterr().err.splitlines()
    assert messages == ["warning: skipping unreadable image x/a.png: truncated",
                        "warning: skipping unreadable image b.png: not an image"]
    assert log.count == 2 and log.summary() == "skipped 2 unreadable files"
    log.add([("c.png", "permission denied")])
    assert capsys.readouterr().err == "warning: skipping unreadable image c.png: permission denied\n"
    assert log.count == 3


def test_make_loader_separates_failures(mixed_folder):
    folder = ImageFolder(mixed_folder, 3, 16)
    loader = make_loader(folder, batch_size=2, shuffle=True, num_workers=0, seed=7)
    batches = list(loader)
    assert len(batches) == 2
    paths = [p for b in batches for p in b.paths]
    failed = [p for b in batches for p, _ in b.failures]
    assert sorted(paths) == ["a.png", "sub/b.jpg"]
    assert sorted(failed) == ["c_trunc.png", "d_text.png"]
    for b in batches:
        if b.images is not None:
            assert b.images.shape == (len(b.paths), 3, 16, 16)
    again = [p for b in make_loader(folder, 2, True, 0, seed=7) for p in b.paths]
    assert again == paths


def test_open_mnist_from_local_files(tmp_path, monkeypatch):
    _offline(monkeypatch)
    _write_mnist(tmp_path)
    train = open_dataset("mnist", tmp_path, train=True, channels=3, image_size=14)
    assert isinstance(train, TorchvisionImages) and len(train) == 5
    item = train[2]
    assert item["path"] == "mnist/train/000002" and item["label"] == 2 and item["index"] == 2
    assert item["image"].shape == (3, 14, 14)
    assert torch.all(item["image"][:, :, :5] == 1.0) and torch.all(item["image"][:, :, 7:] == -1.0)
    test = open_dataset("MNIST", tmp_path, train=False, channels=1, image_size=28)
    assert len(test) == 3 and test[0]["path"] == "mnist/test/000000"
    batch = collate([test[i] for i in range(3)])
    assert batch.images.shape == (3, 1, 28, 28) and batch.labels.tolist() == [0, 1, 2]


def test_open_mnist_offline_without_files(tmp_path, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(DataError) as info:
        open_dataset("mnist", tmp_path / "empty", train=True, channels=1, image_size=28)
    message = str(info.value)
    assert "'mnist'" in message and str(tmp_path / "empty") in message
    assert "train-images-idx3-ubyte" in message and "MNIST" in message
    assert info.value.__cause__ is None and info.value.__context__ is None  # no traceback chain


def test_unknown_dataset_suggests(tmp_path):
    with pytest.raises(DataError, match="Did you mean 'cifar10'"):
        open_dataset("cifar-10", tmp_path, train=True, channels=3, image_size=32)
    with pytest.raises(DataError, match="Did you mean 'fashion-mnist'"):
        TorchvisionImages("fashon-mnist", tmp_path, True, 1, 28)


def test_open_folder(mixed_folder):
    folder = open_dataset("folder", mixed_folder, train=True, channels=1, image_size=8)
    assert isinstance(folder, ImageFolder) and len(folder) == 4


def test_save_image_and_grid(tmp_path):
    image = torch.linspace(-2, 2, 3 * 8 * 8).reshape(3, 8, 8)
    save_image(image, tmp_path / "new" / "one.png")
    with Image.open(tmp_path / "new" / "one.png") as img:
        assert img.mode == "RGB" and img.size == (8, 8)
        array = np.asarray(img)
        assert array.min() == 0 and array.max() == 255

    rows = [torch.zeros(3, 1, 8, 10), torch.ones(2, 1, 8, 10)]
    save_grid(rows, tmp_path / "grids" / "grid.png", padding=2)
    with Image.open(tmp_path / "grids" / "grid.png") as img:
        assert img.mode == "L" and img.size == (2 + 3 * 12, 2 + 2 * 10)
    save_grid([torch.zeros(2, 4, 6, 6)], tmp_path / "rgba.png", padding=1)
    with Image.open(tmp_path / "rgba.png") as img:
        assert img.mode == "RGBA" and img.size == (15, 8)
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "grid.png", "grids", "new", "one.png", "rgba.png"]  # no temp files left behind


def test_sample_images_draw_a_seeded_random_subset_of_a_class_sorted_folder(tmp_path):
    """On the digits layout (0/, 1/, ... sorted) the first files are all of class 0: the
    grids draw at random instead, the same images for the same seed."""
    for label, value in (("0", 0), ("1", 255)):
        (tmp_path / label).mkdir()
        for i in range(12):
            Image.fromarray(np.full((8, 8), value, np.uint8)).save(tmp_path / label / f"{i}.png")
    dataset = open_dataset("folder", tmp_path, train=False, channels=1, image_size=8)
    images = sample_images(dataset, 8, seed=0)
    means = images.flatten(1).mean(1)
    assert images.shape == (8, 1, 8, 8)
    assert (means < 0).any() and (means > 0).any()  # both classes shown
    assert torch.equal(images, sample_images(dataset, 8, seed=0))
    assert not torch.equal(images, sample_images(dataset, 8, seed=1))


def test_cached_items_equal_uncached_ones_bitwise(tmp_path):
    root = _photo_folder(tmp_path)
    plain = open_dataset("folder", root, train=True, channels=3, image_size=16)
    cached = open_dataset("folder", root, train=True, channels=3, image_size=16)
    assert cached.enable_cache("ram") is None
    for _ in range(2):  # the first pass fills the cache, the second reads from it
        for i in range(len(plain)):
            a, b = plain[i], cached[i]
            if a["image"] is None:  # the broken file: never cached, reported every time
                assert b["image"] is None and b["error"] == a["error"]
            else:
                assert torch.equal(a["image"], b["image"]) and a["path"] == b["path"]
    assert int(cached.cache.filled.sum()) == len(plain) - 1


def test_loader_workers_fill_the_shared_cache(tmp_path):
    root = _photo_folder(tmp_path)
    dataset = open_dataset("folder", root, train=True, channels=3, image_size=16)
    dataset.enable_cache("ram")
    first = [b.images for b in make_loader(dataset, 4, shuffle=False, num_workers=2)]
    assert int(dataset.cache.filled.sum()) == len(dataset) - 1  # written by the worker processes
    again = [b.images for b in make_loader(dataset, 4, shuffle=False, num_workers=0)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_cache_modes(tmp_path):
    from flexvae.data.cache import make_cache

    assert make_cache("off", 10, (3, 8, 8)) == (None, None)
    cache, note = make_cache("auto", 10, (3, 8, 8), available=10 * 192 * 4)  # a quarter of RAM exactly
    assert cache is not None and note is None
    cache, note = make_cache("auto", 10, (3, 8, 8), available=10 * 192 * 4 - 1)
    assert cache is None and "reading them from disk every epoch" in note
    with pytest.raises(DataError, match="data.cache = 'ram': the 10 decoded images need"):
        make_cache("ram", 10, (3, 8, 8), available=100)


def test_batches_gathered_from_the_cache_equal_the_loader_s(tmp_path):
    from itertools import islice

    from flexvae.data.cache import CachedLoader, fill_cache
    from flexvae.train.sampler import StreamSampler

    root = _photo_folder(tmp_path)
    plain = open_dataset("folder", root, train=True, channels=3, image_size=16)
    cached = open_dataset("folder", root, train=True, channels=3, image_size=16)
    cached.enable_cache("ram")
    fill_cache(cached, 0)
    sampler = StreamSampler(len(plain), seed=4, start=3)
    expected = list(islice(iter(make_loader(plain, 4, shuffle=False, num_workers=0, sampler=sampler)), 7))
    found = list(islice(iter(CachedLoader(cached, 4, sampler)), 7))
    for a, b in zip(expected, found):
        assert a.paths == b.paths and a.indices == b.indices and a.failures == b.failures
        assert torch.equal(a.images, b.images)
    assert any(batch.failures for batch in found)  # the broken file came up and was reported
