"""Validation on real images (battery weld, copied into tmp_path): every file decoded, the empty-mask policy."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from supersimplenet.layouts import read_layout
from supersimplenet.loading import DefectDataset, load_image
from supersimplenet.samples import DataError
from supersimplenet.supervision import apply_supervision
from supersimplenet.validation import check_samples, decode_file

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def test_a_truncated_jpeg_bmp_and_png_are_all_named_with_the_reason(small_weld, damage):
    root = small_weld
    train = sorted((root / "train/good").iterdir())
    jpeg = damage.truncate(damage.reencode(train[0], "JPEG", ".jpg"))
    bmp = damage.truncate(damage.reencode(train[1], "BMP", ".bmp"))
    png = damage.truncate(sorted((root / "test/defective").iterdir())[0])
    with pytest.raises(DataError) as info:
        check_samples(root, read_layout(root, "mvtec"))
    message = str(info.value)
    for bad in (jpeg, bmp, png):
        assert f"unreadable image: {bad}" in message
    assert message.count("truncated") >= 2  # Pillow's reason, e.g. "image file is truncated (19 bytes not processed)"
    assert "3 problem(s)" in message
    with pytest.raises(DataError, match="image file is truncated"):  # training reads files by the same rule
        load_image(jpeg, size=(64, 32))


def test_a_truncated_mask_is_named(small_weld, damage):
    root = small_weld
    mask = damage.truncate(sorted((root / "ground_truth/defective").iterdir())[1], keep=0.5)
    with pytest.raises(DataError, match=re.escape(f"unreadable mask: {mask}")):
        check_samples(root, read_layout(root, "mvtec"))


def test_decoding_records_the_digest_of_the_bytes_it_decoded(small_weld):
    import hashlib

    root = small_weld
    checked = check_samples(root, read_layout(root, "mvtec"), workers=2)
    assert len(checked.files) == 3 + 2 + 3 + 3
    for rel, (sha, size) in checked.files.items():
        data = (root / rel).read_bytes()
        assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    image = next(iter(sorted((root / "train/good").iterdir())))
    assert decode_file(image, "image").size == Image.open(image).size


def test_an_empty_mask_of_a_defective_image_is_refused_naming_the_files_and_the_option(small_weld, damage):
    root = small_weld
    masks = [damage.blank_mask(m) for m in sorted((root / "ground_truth/defective").iterdir())[:2]]
    with pytest.raises(DataError) as info:
        check_samples(root, read_layout(root, "mvtec"))
    message = str(info.value)
    for mask in masks:
        assert f"empty mask for a defective image: {mask}" in message
    assert "2 defective image(s) have an empty mask" in message
    assert "--empty-masks" in message and "label-only" in message and "drop" in message


def test_label_only_keeps_the_image_as_defective_without_a_mask_and_training_does_not_segment_it(small_weld, damage):
    root = small_weld
    mask = damage.blank_mask(sorted((root / "ground_truth/defective").iterdir())[0])
    image = f"test/defective/{mask.name}"
    checked = check_samples(root, read_layout(root, "mvtec"), empty_masks="label-only")
    assert checked.empty_masks == (image,) and checked.policy == "label-only"
    (sample,) = [s for s in checked.samples if s.image == image]
    assert (sample.label, sample.mask, sample.segmented) == (1, None, False)
    assert f"ground_truth/defective/{mask.name}" not in checked.files
    assert len(checked.samples) == 8
    # the supervised regime keeps it as is: its label trains, no map loss uses the (unknown) mask
    assert apply_supervision(checked.samples, "supervised") == list(checked.samples)
    item = DefectDataset(root=root, samples=[sample], image_size=(64, 32), mean=MEAN, std=STD)[0]
    assert not bool(item["segmented"]) and float(item["label"]) == 1.0 and float(item["mask"].sum()) == 0.0


def test_drop_leaves_the_images_with_an_empty_mask_out(small_weld, damage):
    root = small_weld
    masks = [damage.blank_mask(m) for m in sorted((root / "ground_truth/defective").iterdir())[1:]]
    checked = check_samples(root, read_layout(root, "mvtec"), empty_masks="drop")
    dropped = {f"test/defective/{m.name}" for m in masks}
    assert set(checked.empty_masks) == dropped
    assert len(checked.samples) == 6 and not dropped & {s.image for s in checked.samples}
    assert not {f"ground_truth/defective/{m.name}" for m in masks} & set(checked.files)


def test_an_unknown_empty_mask_policy_names_the_option(small_weld):
    root = small_weld
    with pytest.raises(ValueError, match="empty_masks must be one of"):
        check_samples(root, read_layout(root, "mvtec"), empty_masks="skip")


def test_a_folder_layout_image_labelled_defective_with_an_empty_mask_follows_the_empty_mask_policy(weld_root, tmp_path):
    root = tmp_path / "folder"
    for split in ("train", "test"):
        (root / split / "images").mkdir(parents=True)
    (root / "test" / "masks").mkdir()
    for src in sorted((weld_root / "train/good").iterdir())[:2]:
        shutil.copy(src, root / "train/images" / src.name)
    src = sorted((weld_root / "test/defective").iterdir())[0]
    shutil.copy(src, root / "test/images" / src.name)
    Image.fromarray(np.zeros(Image.open(src).size[::-1], dtype=np.uint8)).save(root / "test/masks" / src.name)
    train = "".join(f"train/images/{p.name},0\n" for p in (root / "train/images").iterdir())
    (root / "labels.csv").write_text(f"image,label\n{train}test/images/{src.name},1\n")
    samples = read_layout(root, "folder")
    with pytest.raises(DataError, match="--empty-masks"):
        check_samples(root, samples)
    (kept,) = [s for s in check_samples(root, samples, empty_masks="label-only").samples if s.split == "test"]
    assert (kept.label, kept.mask, kept.segmented) == (1, None, False)
