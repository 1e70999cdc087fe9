"""The synthetic camouflage generator: layout, format, determinism, refusal to overwrite other data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camoxpert.synthetic import MARKER_FILE, generate_dataset, main, make_scene


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER_FILE
    }


def test_layout_names_and_format(tmp_path):
    root = generate_dataset(tmp_path / "d", num_train=3, num_test=2, size=48, seed=1, noncam_test=1)
    assert root == tmp_path / "d"
    train = sorted(p.name for p in (root / "Train" / "Image").iterdir())
    test = sorted(p.name for p in (root / "Test" / "Image").iterdir())
    assert len(train) == 3
    assert len(test) == 3
    assert all(n.startswith("COD10K-CAM-") and n.endswith(".jpg") for n in train)
    assert sum(n.startswith("COD10K-NonCAM-") for n in test) == 1
    for split, names in (("Train", train), ("Test", test)):
        for name in names:
            image = Image.open(root / split / "Image" / name)
            mask = Image.open(root / split / "GT_Object" / name.replace(".jpg", ".png"))
            assert (image.mode, image.size) == ("RGB", (48, 48))
            assert (mask.mode, mask.size) == ("L", (48, 48))
            values = set(np.unique(np.asarray(mask)).tolist())
            if "NonCAM" in name:
                assert values == {0}
            else:
                assert values == {0, 255}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _digest(generate_dataset(tmp_path / "a", num_train=4, num_test=2, size=40, seed=7))
    b = _digest(generate_dataset(tmp_path / "b", num_train=4, num_test=2, size=40, seed=7))
    c = _digest(generate_dataset(tmp_path / "c", num_train=4, num_test=2, size=40, seed=8))
    assert a == b
    assert len(a) == 12
    # Names carry the shape kind drawn, so compare files by folder and running number.
    by_number = {(str(Path(k).parent), k.rsplit("-", 1)[1]): v for k, v in a.items()}
    other = {(str(Path(k).parent), k.rsplit("-", 1)[1]): v for k, v in c.items()}
    assert set(by_number) == set(other)
    assert all(by_number[k] != other[k] for k in by_number)


def test_test_count_does_not_change_train_images(tmp_path):
    a = _digest(generate_dataset(tmp_path / "a", num_train=3, num_test=1, size=32, seed=0))
    b = _digest(generate_dataset(tmp_path / "b", num_train=3, num_test=5, size=32, seed=0))
    train_a = {k: v for k, v in a.items() if k.startswith("Train")}
    assert train_a == {k: v for k, v in b.items() if k.startswith("Train")}
    assert len(train_a) == 6


def test_object_shares_the_background_palette():
    # The object is no colour outlier: its mean colour is close to the background's.
    gaps, spreads = [], []
    for seed in range(20):
        image, mask, kind = make_scene(np.random.default_rng(seed), 96)
        assert kind in ("blob", "ellipse", "polygon")
        pixels = image.reshape(-1, 3).astype(float)
        inside = mask.reshape(-1) > 0
        assert 0.02 < inside.mean() < 0.5
        gaps.append(np.linalg.norm(pixels[inside].mean(0) - pixels[~inside].mean(0)))
        spreads.append(pixels[~inside].std(0).mean())
    assert np.median(gaps) < np.median(spreads)


def test_regenerating_replaces_own_output_but_refuses_foreign_data(tmp_path):
    root = generate_dataset(tmp_path / "d", num_train=4, num_test=2, size=32)
    generate_dataset(root, num_train=2, num_test=1, size=32)
    assert len(list((root / "Train" / "Image").iterdir())) == 2
    foreign = tmp_path / "real"
    (foreign / "Train" / "Image").mkdir(parents=True)
    (foreign / "Train" / "Image" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_dataset(foreign, num_train=1, num_test=1, size=32)
    assert (foreign / "Train" / "Image" / "cat.jpg").read_bytes() == b"x"


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path / "d"), "--num-train", "2", "--num-test", "1", "--size", "32", "--noncam-test", "1"]) == 0
    assert "wrote 2 train, 1 test and 1 NonCAM" in capsys.readouterr().out
    assert len(list((tmp_path / "d" / "Test" / "GT_Object").iterdir())) == 2
    assert main([str(tmp_path / "e"), "--size", "4"]) == 2
