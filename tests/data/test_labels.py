"""data/labels.py: class labels from folders or CSV files, and their path through the cache."""

from __future__ import annotations

import pytest
import torch

from flexvae.data.labels import input_labels, keep_fraction, read_labels
from flexvae.errors import DataError
from helpers.labelled import CLASSES, labelled_folder


# ------------------------------------------------------------------ labels
def test_folder_labels_sort_classes_and_leave_root_images_unlabelled(tmp_path):
    rels = ["10/x.png", "2/y.png", "2/z.png", "top.png", "10/deep/w.png"]
    labels = read_labels("folders", rels, tmp_path)
    assert labels.classes == ("2", "10")  # whole numbers sort as numbers
    assert labels.indices.tolist() == [1, 0, 0, -1, 1]
    assert labels.labelled == 4


def test_folder_labels_need_sub_folders(tmp_path):
    with pytest.raises(DataError, match="no image of .* is in a sub-folder"):
        read_labels("folders", ["a.png", "b.png"], tmp_path)
    with pytest.raises(DataError, match="name 1 class; conditioning needs at least 2"):
        read_labels("folders", ["a/x.png"], tmp_path)


def test_csv_labels_header_comments_and_unlisted_images(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n# a comment\n./x.png,cat\nsub/y.png , dog\n\n")
    labels = read_labels("labels.csv", ["x.png", "sub/y.png", "z.png"], tmp_path, csv_path=csv)
    assert labels.classes == ("cat", "dog") and labels.indices.tolist() == [0, 1, -1]


@pytest.mark.parametrize("text, message", [
    ("x.png,cat\nmissing.png,dog\n", r"labels.csv:2: 'missing.png' is not an image of the data folder"),
    ("x.png,cat\nx.png,dog\n", r"labels.csv:2: x.png is labelled twice \('cat' and 'dog'\)"),
    ("x.png\n", r"labels.csv:1: expected 'relative path,label', found 'x.png'"),
    ("x.png,a,b\n", r"labels.csv:1: expected 'relative path,label'"),
])
def test_csv_label_errors_name_file_and_line(tmp_path, text, message):
    csv = tmp_path / "labels.csv"
    csv.write_text(text)
    with pytest.raises(DataError, match=message):
        read_labels("labels.csv", ["x.png", "y.png"], tmp_path, csv_path=csv)


def test_missing_csv_is_one_error(tmp_path):
    with pytest.raises(DataError, match="label file not found"):
        read_labels("nope.csv", ["x.png"], tmp_path, csv_path=tmp_path / "nope.csv")


def test_label_fraction_keeps_a_seeded_share_of_each_class():
    indices = torch.tensor([0] * 50 + [1] * 30 + [-1] * 5)
    kept = keep_fraction(indices, 0.1, seed=3)
    assert int((kept[:50] == 0).sum()) == 5 and int((kept[50:80] == 1).sum()) == 3
    assert (kept[80:] == -1).all() and set(kept.tolist()) <= {-1, 0, 1}
    assert torch.equal(kept, keep_fraction(indices, 0.1, seed=3))
    assert not torch.equal(kept, keep_fraction(indices, 0.1, seed=4))
    assert int((keep_fraction(torch.tensor([0, 1, 1]), 0.01, 0) >= 0).sum()) == 2  # at least one per class


def test_a_models_classes_map_other_folders_and_reject_unknown_ones(tmp_path):
    labels = read_labels("folders", ["b/1.png", "a/2.png"], tmp_path, classes=("a", "b", "c"))
    assert labels.indices.tolist() == [1, 0] and labels.classes == ("a", "b", "c")
    with pytest.raises(DataError, match=r"class 'z' is not one of the model's 3 classes \(a, b, c\)"):
        read_labels("folders", ["z/1.png", "a/2.png"], tmp_path, classes=("a", "b", "c"))


def test_input_labels_auto_uses_class_folders_only(tmp_path):
    labels, note = input_labels("auto", ["a/1.png", "c/2.png"], tmp_path, CLASSES)
    assert labels.indices.tolist() == [0, 2] and "labels (folders)" in note
    labels, note = input_labels("auto", ["a/1.png", "holiday/2.png"], tmp_path, CLASSES)
    assert labels is None and "labels: none" in note
    assert input_labels("none", ["a/1.png"], tmp_path, CLASSES)[0] is None


def test_labels_follow_images_through_the_cache(tmp_path):
    from flexvae.data import ImageFolder, collate
    from flexvae.data.cache import CachedLoader, fill_cache

    root = labelled_folder(tmp_path / "img", per_class=2, unlabelled=2)
    dataset = ImageFolder(root, channels=3, image_size=16)
    dataset.set_labels(read_labels("folders", dataset.relpaths, root))
    plain = collate([dataset[i] for i in range(len(dataset))])
    assert plain.labels.tolist() == [0, 0, 1, 1, 2, 2, -1, -1]
    dataset.enable_cache("ram")
    fill_cache(dataset, 0)
    cached = next(iter(CachedLoader(dataset, len(dataset), list(range(len(dataset))))))
    assert torch.equal(cached.labels, plain.labels) and torch.equal(cached.images, plain.images)
