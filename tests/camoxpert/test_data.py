"""Data: layout detection and its errors, pairing, NonCAM, val split, augmentation alignment, the cache."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from camoxpert.data import build_eval_dataset, build_train_val, detect_layout, pair_files, read_mask
from camoxpert.decode import MaskFormatError
from camoxpert.errors import UnreadableFileError
from camoxpert.synthetic import generate_dataset
from camoxpert.transforms import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(scope="module")
def cod10k(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("cod") / "COD10K-v3", num_train=20, num_test=4, size=32,
                            seed=3, noncam_test=2)


def _copy(cod10k: Path, dst: Path) -> Path:
    shutil.copytree(cod10k, dst, ignore=shutil.ignore_patterns(".camoxpert-cache"))
    return dst


def _imgs_gt(folder: Path, source: Path, split: str = "Test") -> None:
    """Copy a COD10K split into ``folder/Imgs`` + ``folder/GT``."""
    shutil.copytree(source / split / "Image", folder / "Imgs")
    shutil.copytree(source / split / "GT_Object", folder / "GT")


# --- layout detection ------------------------------------------------------------------------------------


def test_detects_cod10k_v3(cod10k):
    layout = detect_layout(cod10k)
    assert layout.kind == "COD10K-v3"
    assert list(layout.splits) == ["train", "test"]
    assert layout.split("train").image_dir == cod10k / "Train" / "Image"
    assert layout.split("test").mask_dir == cod10k / "Test" / "GT_Object"
    assert len(pair_files(layout.split("train"))) == 20


def test_detects_cod10k_in_its_only_subfolder(cod10k):
    # Kaggle mounts COD10K-v3 one level down: /kaggle/input/cod10k-dataset/COD10K-v3
    assert detect_layout(cod10k.parent).root == cod10k


def test_detects_sinet_v2(tmp_path, cod10k):
    _imgs_gt(tmp_path / "TrainDataset", cod10k, "Train")
    for name in ("CAMO", "NC4K"):
        _imgs_gt(tmp_path / "TestDataset" / name, cod10k)
    layout = detect_layout(tmp_path)
    assert layout.kind == "SINet-V2"
    assert list(layout.splits) == ["train", "CAMO", "NC4K"]
    assert layout.split("NC4K").image_dir == tmp_path / "TestDataset" / "NC4K" / "Imgs"
    with pytest.raises(KeyError, match="several test sets"):
        layout.split("test")
    _imgs_gt(tmp_path / "TestDataset" / "COD10K", cod10k)
    assert detect_layout(tmp_path).split("test").name == "COD10K"
    assert len(build_eval_dataset(tmp_path, split="CAMO", img_size=16, cache=False)) == 4


def test_detects_plain_imgs_gt_for_evaluation_only(tmp_path, cod10k):
    _imgs_gt(tmp_path / "NC4K", cod10k)
    layout = detect_layout(tmp_path / "NC4K")
    assert (layout.kind, list(layout.splits)) == ("Imgs+GT", ["test"])
    assert len(build_eval_dataset(tmp_path / "NC4K", img_size=16, cache=False)) == 4
    with pytest.raises(KeyError, match="no split 'train'"):
        build_train_val(tmp_path / "NC4K", img_size=16, cache=False)


def test_unknown_layout_lists_what_was_looked_for_and_found(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(FileNotFoundError) as info:
        detect_layout(tmp_path)
    message = str(info.value)
    for expected in ("Train/Image + Train/GT_Object", "TrainDataset/Imgs + TrainDataset/GT",
                     "TestDataset/<NAME>/Imgs", "Imgs + GT", "images/, masks/, readme.txt", "--dataset-path"):
        assert expected in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_layout(tmp_path / "nowhere")


def test_half_a_layout_shows_what_is_there(tmp_path):
    (tmp_path / "Train" / "Image").mkdir(parents=True)
    (tmp_path / "Train" / "GT").mkdir()
    with pytest.raises(FileNotFoundError, match=r"Found in .*Train: GT/, Image/"):
        detect_layout(tmp_path)


# --- pairing errors ---------------------------------------------------------------------------------------


def test_missing_mask_is_named(tmp_path, cod10k):
    root = _copy(cod10k, tmp_path / "d")
    victim = sorted((root / "Train" / "GT_Object").iterdir())[5]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 of 20 images .* no mask .*{victim.stem}\.jpg.*Fix: add"):
        build_train_val(root, img_size=16, cache=False)


def test_missing_image_is_named(tmp_path, cod10k):
    root = _copy(cod10k, tmp_path / "d")
    victims = sorted((root / "Test" / "Image").iterdir())[:2]
    for victim in victims:
        victim.unlink()
    with pytest.raises(FileNotFoundError, match=rf"2 of 6 masks .* no image .*{victims[0].stem}\.png"):
        build_eval_dataset(root, img_size=16, cache=False)


@pytest.mark.parametrize("cache", [False, "memory", True])
def test_unreadable_image_is_named(tmp_path, cod10k, cache):
    root = _copy(cod10k, tmp_path / "d")
    victim = sorted((root / "Train" / "Image").iterdir())[3]
    victim.write_bytes(b"not a jpeg at all")
    with pytest.raises(OSError, match=rf"(?s)1 of 20 .*could not be read:\n  {victim.name}.*Fix: re-extract"):
        build_train_val(root, img_size=16, cache=cache)


def test_other_files_are_ignored(tmp_path, cod10k):
    root = _copy(cod10k, tmp_path / "d")
    (root / "Train" / "Image" / ".DS_Store").write_bytes(b"\0")
    (root / "Train" / "GT_Object" / "Thumbs.db").write_bytes(b"\0")
    assert len(pair_files(detect_layout(root).split("train"))) == 20


# --- splits ----------------------------------------------------------------------------------------------


def test_noncam_left_out_of_test_by_default(tmp_path, cod10k):
    root = _copy(cod10k, tmp_path / "d")
    # A CAM-named image whose mask is empty is NonCAM too.
    mask_path = sorted((root / "Test" / "GT_Object").glob("COD10K-CAM-*"))[0]
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(mask_path)
    for cache in (False, True):
        test = build_eval_dataset(root, img_size=16, cache=cache, cache_dir=tmp_path / "c")
        names = [test.name(i) for i in range(len(test))]
        assert len(names) == 3
        assert mask_path.stem not in names
        assert not any("NonCAM" in n for n in names)
        assert len(build_eval_dataset(root, img_size=16, keep_noncam=True, cache=cache, cache_dir=tmp_path / "c")) == 6


def test_val_is_held_out_of_train_seeded_and_disjoint(cod10k):
    train, val = build_train_val(cod10k, img_size=16, val_fraction=0.25, seed=1, cache=False)
    train_names = {train.name(i) for i in range(len(train))}
    val_names = [val.name(i) for i in range(len(val))]
    all_train = {p.stem for p in (cod10k / "Train" / "Image").iterdir()}
    assert len(val_names) == 5
    assert len(train_names) == 15
    assert train_names.isdisjoint(val_names)
    assert train_names | set(val_names) == all_train
    again = build_train_val(cod10k, img_size=16, val_fraction=0.25, seed=1, cache=False)[1]
    assert [again.name(i) for i in range(len(again))] == val_names
    other = build_train_val(cod10k, img_size=16, val_fraction=0.25, seed=2, cache=False)[1]
    assert [other.name(i) for i in range(len(other))] != val_names
    as_eval = build_eval_dataset(cod10k, split="val", img_size=16, val_fraction=0.25, seed=1, cache=False)
    assert [as_eval.name(i) for i in range(len(as_eval))] == val_names
    assert len(build_train_val(cod10k, img_size=16, val_fraction=0.0, cache=False)[1]) == 0


# --- datasets and augmentation -----------------------------------------------------------------------------


def test_item_types_and_eval_api(tmp_path):
    folder = tmp_path / "CHAMELEON"
    (folder / "Imgs").mkdir(parents=True)
    (folder / "GT").mkdir()
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 20:50] = 255
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(folder / "Imgs" / "animal_1.jpg")
    Image.fromarray(mask).save(folder / "GT" / "animal_1.png")
    ds = build_eval_dataset(folder, img_size=24, cache=False)
    image, index = ds[0]
    assert (image.shape, image.dtype, index) == ((3, 24, 24), torch.float32, 0)
    assert ds.original_size(0) == (40, 60)
    assert ds.name(0) == "animal_1"
    np.testing.assert_array_equal(ds.original_mask(0), mask)
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    # 0.02 in normalised units is about one uint8 level after the bilinear resize's rounding.
    torch.testing.assert_close(image[:, 12, 12], expected, atol=0.02, rtol=0)


def test_training_items(cod10k):
    train, _ = build_train_val(cod10k, img_size=24, cache=False)
    image, mask = train[0]
    assert (image.shape, image.dtype) == ((3, 24, 24), torch.float32)
    assert (mask.shape, mask.dtype) == ((1, 24, 24), torch.float32)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert type(image) is torch.Tensor
    assert type(mask) is torch.Tensor


@pytest.mark.parametrize("augment", ["standard", "light"])
def test_augmentation_keeps_image_and_mask_aligned(tmp_path, augment):
    # The image is white exactly where the mask is set: after any crop/flip/rotation/jitter the bright
    # pixels must still be the mask's pixels (up to interpolation at the edge).
    folder = tmp_path / "d" / "Train"
    (folder / "Image").mkdir(parents=True)
    (folder / "GT_Object").mkdir()
    mask = np.zeros((64, 64), np.uint8)
    mask[8:30, 10:50] = 255
    mask[30:56, 10:22] = 255  # an asymmetric "L": a flip or rotation that missed the mask would show
    Image.fromarray(np.repeat(mask[..., None], 3, axis=2)).save(folder / "Image" / "a.png")
    Image.fromarray(mask).save(folder / "GT_Object" / "a.png")
    train, _ = build_train_val(tmp_path / "d", img_size=48, val_fraction=0.0, cache=False, augment=augment)
    torch.manual_seed(0)
    masks = []
    for _ in range(40):
        image, target = train[0]
        grey = (image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]).mean(0)
        fg = target[0] > 0.5
        # Away from a 1-pixel band around the mask's edge (bilinear image vs nearest mask) they agree,
        # but for a few corner pixels; a flip or crop applied to one and not the other breaks hundreds.
        grown = torch.nn.functional.max_pool2d(fg[None].float(), 3, 1, 1)[0] > 0
        shrunk = -torch.nn.functional.max_pool2d(-fg[None].float(), 3, 1, 1)[0] > 0
        interior = ~(grown & ~shrunk)
        assert fg.sum() > 100
        assert ((grey > 0.35) != fg)[interior].sum() <= 12
        masks.append(target)
    distinct = {tuple(m.flatten().tolist()) for m in masks}
    assert len(distinct) > 30  # the augmentation really moves things
    with pytest.raises(ValueError, match="augment='heavy': choose one of standard, light, none"):
        build_train_val(tmp_path / "d", img_size=48, val_fraction=0.0, cache=False, augment="heavy")


# --- the cache ----------------------------------------------------------------------------------------------


def test_cached_and_uncached_items_are_identical(tmp_path, cod10k):
    for split in ("test", "train"):
        a = build_eval_dataset(cod10k, split=split, img_size=24, cache=False)
        b = build_eval_dataset(cod10k, split=split, img_size=24, cache=True, cache_dir=tmp_path)
        c = build_eval_dataset(cod10k, split=split, img_size=24, cache="memory")
        assert len(a) == len(b) == len(c)
        for i in range(len(a)):
            assert torch.equal(a[i][0], b[i][0])
            assert torch.equal(a[i][0], c[i][0])
            assert a.original_size(i) == b.original_size(i) == (32, 32)
    ta, _ = build_train_val(cod10k, img_size=24, augment="none", cache=False)
    tb, _ = build_train_val(cod10k, img_size=24, augment="none", cache_dir=tmp_path)
    assert all(torch.equal(ta[i][0], tb[i][0]) and torch.equal(ta[i][1], tb[i][1]) for i in range(len(ta)))


def test_cache_is_reused_and_invalidated(tmp_path, cod10k):
    root = _copy(cod10k, tmp_path / "d")
    cache_dir = tmp_path / "cache"
    first = build_eval_dataset(root, img_size=16, cache_dir=cache_dir)
    files = sorted(p.name for p in cache_dir.glob("*.npy"))
    assert len(files) == 2
    assert all("-16px-" in f for f in files)
    stamp = {p: p.stat().st_mtime_ns for p in cache_dir.glob("*.npy")}
    build_eval_dataset(root, img_size=16, cache_dir=cache_dir)
    assert {p: p.stat().st_mtime_ns for p in cache_dir.glob("*.npy")} == stamp  # reused, not rebuilt
    # A changed image gives a new key; the stale cache of the same split and size is removed.
    target = root / "Test" / "Image" / f"{first.name(0)}.jpg"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(target)
    os.utime(target, ns=(1, 1))
    changed = build_eval_dataset(root, img_size=16, cache_dir=cache_dir)
    assert sorted(p.name for p in cache_dir.glob("*.npy")) != files
    assert len(list(cache_dir.glob("*.npy"))) == 2
    assert changed[0][0].std(dim=(1, 2)).max() < 0.01  # the black image, not the cached old one
    # Another img_size gets its own cache.
    build_eval_dataset(root, img_size=20, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("*-20px-*.npy"))) == 2


def test_default_cache_dir_is_next_to_the_data(tmp_path, cod10k):
    root = _copy(cod10k, tmp_path / "d")
    build_eval_dataset(root, img_size=16)
    assert len(list((root / ".camoxpert-cache").glob("*.npy"))) == 2
    assert detect_layout(root).kind == "COD10K-v3"  # the cache folder does not confuse detection


def test_memory_mapped_cache_pickles_as_paths(tmp_path, cod10k):
    train, val = build_train_val(cod10k, img_size=32, cache_dir=tmp_path)
    blob = pickle.dumps(train)
    assert len(blob) < 20_000  # 20 images x 40x40x3 would be ~100 kB if the arrays were copied
    clone = pickle.loads(blob)
    torch.manual_seed(5)
    a = train[2]
    torch.manual_seed(5)
    b = clone[2]
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])


def test_unusable_cache_dir_falls_back_to_memory(tmp_path, cod10k, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    ds = build_eval_dataset(cod10k, img_size=16, cache_dir=blocker / "cache")
    assert len(ds) == 4
    assert ds.source.cache.paths is None  # in memory
    assert "caching in memory" in caplog.text
    with pytest.raises(ValueError, match="cache='disc'"):
        build_eval_dataset(cod10k, img_size=16, cache="disc")


# --- what a mask means ---------------------------------------------------------------------------------------


def _object() -> np.ndarray:
    mask = np.zeros((24, 32), bool)
    mask[5:19, 8:26] = True
    return mask


@pytest.mark.parametrize(("name", "pixels"), [
    ("0-255", _object().astype(np.uint8) * 255),
    ("0-1", _object().astype(np.uint8)),
    ("0-100", _object().astype(np.uint8) * 100),
    ("16-bit 0-65535", _object().astype(np.uint16) * 65535),
    ("16-bit 0-1", _object().astype(np.uint16)),
])
def test_binary_masks_of_any_scale_read_the_same(tmp_path, name, pixels):
    path = tmp_path / "mask.png"
    Image.fromarray(pixels).save(path)
    np.testing.assert_array_equal(read_mask(path), _object().astype(np.uint8) * 255)


def test_palette_mask_foreground_is_the_non_zero_index_whatever_its_colour(tmp_path):
    palette_mask = Image.fromarray(_object().astype(np.uint8), mode="P")
    palette_mask.putpalette([255, 255, 255, 20, 0, 0] + [0] * 762)  # background white, object near black
    palette_mask.save(tmp_path / "mask.png")
    assert Image.open(tmp_path / "mask.png").mode == "P"
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.png"), _object().astype(np.uint8) * 255)


def test_colour_mask_on_black_reads_as_its_object(tmp_path):
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[_object()] = (255, 0, 0)  # a red object: 76 in grayscale, below the 0/255 threshold
    Image.fromarray(rgb).save(tmp_path / "mask.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.png"), _object().astype(np.uint8) * 255)


def test_anti_aliased_grayscale_keeps_the_128_threshold(tmp_path):
    grey = _object().astype(np.uint8) * 250
    grey[5, 8:26] = 200  # soft top edge: object
    grey[18, 8:26] = 128  # soft bottom edge at exactly 128: background, as py_sod_metrics binarises
    grey[6:18, 7] = 40
    Image.fromarray(grey).save(tmp_path / "mask.png")
    expected = np.where(grey > 128, 255, 0)
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.png"), expected)


@pytest.mark.parametrize(("pixels", "reason"), [
    (np.tile(np.linspace(0, 255, 32).astype(np.uint8), (24, 1)), "mid-grey"),  # a photograph or probability map
    (np.tile(np.array([0, 1, 2, 3], np.uint8).repeat(8), (24, 1)), "none near the full scale 255"),  # labels
])
def test_a_mask_that_is_not_binary_is_refused_with_its_name(tmp_path, cod10k, pixels, reason):
    root = _copy(cod10k, tmp_path / "d")
    victim = sorted((root / "Train" / "GT_Object").iterdir())[4]
    Image.fromarray(pixels).save(victim)
    with pytest.raises(MaskFormatError, match=rf"mask .*{victim.name} is not a binary mask \(.*{reason}"):
        read_mask(victim)
    with pytest.raises(UnreadableFileError, match=rf"(?s)1 of 20 masks under .* are not binary masks:\n  "
                                                  rf"{victim.name} \(.*{reason}.*\nFix: save masks with 0"):
        build_train_val(root, img_size=16, cache_dir=tmp_path / "cache")
