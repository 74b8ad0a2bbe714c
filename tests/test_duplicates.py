"""dataloaders/duplicates.py: planted copies found (recall), look-alikes and distinct images not (precision),
groups, partners across lists, the clean subset, the closest-pairs picture; the provenance check on lossy
and mirrored copies (issue 33, item 2)."""
from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from dataloaders.duplicates import (DEFAULT_THRESHOLD, DUPLICATES_ADVICE, Pair, clean_ids, closest_pairs_image,
                                    find_pairs, fingerprint, fingerprint_images, groups, leak_note, partners)
from dataloaders.io import DataError
from dataloaders.phantom import make_phantom, make_phantom_dataset
from dataloaders.splits import load_run_data

SIZE = (128, 128)
# the six seeds of 0..39 whose two phantoms (same tissue, another lesion) score highest: the hardest look-alikes
LOOK_ALIKE_SEEDS = (4, 8, 12, 19, 33, 38)


def phantom(seed: int, malignant: bool = False) -> np.ndarray:
    return make_phantom(np.random.default_rng(seed), SIZE, malignant)[0]


def jpeg(image: np.ndarray, quality: int = 95) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)


def calipers(image: np.ndarray, seed: int) -> np.ndarray:
    """Two caliper crosses and a measuring line, white, as scanners draw them."""
    marked = image.copy()
    rng = np.random.default_rng(seed)
    points = [tuple(int(v) for v in rng.integers(25, 100, 2)) for _ in range(2)]
    for point in points:
        cv2.drawMarker(marked, point, 255, cv2.MARKER_CROSS, 8, 1)
    cv2.line(marked, points[0], points[1], 200, 1)
    return marked


COPIES = {  # how a copy of an image was made
    "jpeg95": lambda im, s: jpeg(im, 95),
    "jpeg100": lambda im, s: jpeg(im, 100),
    "resized": lambda im, s: cv2.resize(im, (96, 96), interpolation=cv2.INTER_AREA),
    "enlarged": lambda im, s: cv2.resize(im, (200, 180), interpolation=cv2.INTER_LINEAR),
    "calipers": calipers,
    "cropped": lambda im, s: im[3:-2, 2:-4],
    "flipped": lambda im, s: np.ascontiguousarray(im[:, ::-1]),
    "flipped_jpeg": lambda im, s: jpeg(np.ascontiguousarray(im[:, ::-1]), 90),
}


@pytest.fixture(scope="module")
def planted() -> tuple[list[str], list[np.ndarray], set[frozenset]]:
    """12 distinct phantoms, a copy of each made one of the COPIES ways, 6 pairs of look-alikes (another
    lesion in the tissue of one seed); returns ids, images and the set of true duplicate pairs."""
    ids, images, truth = [], [], set()
    kinds = list(COPIES)
    for k in range(12):
        base = phantom(100 + k, malignant=bool(k % 2))
        kind = kinds[k % len(kinds)]
        ids += [f"base{k}", f"copy{k}_{kind}"]
        images += [base, COPIES[kind](base, k)]
        truth.add(frozenset((f"base{k}", f"copy{k}_{kind}")))
    for seed in LOOK_ALIKE_SEEDS:
        ids += [f"alike{seed}_benign", f"alike{seed}_malignant"]
        images += [phantom(seed, malignant=False), phantom(seed, malignant=True)]
    return ids, images, truth


def test_planted_copies_are_found_and_look_alikes_are_not(planted):
    ids, images, truth = planted
    pairs = find_pairs(fingerprint_images(ids, images))
    found = {frozenset((p.a, p.b)) for p in pairs}
    assert found == truth  # recall 1 (every planted copy) and precision 1 (no look-alike, no distinct pair)
    flipped = {frozenset((p.a, p.b)) for p in pairs if p.flipped}
    assert flipped == {t for t in truth if any("flipped" in i for i in t)}
    assert all(DEFAULT_THRESHOLD <= p.score <= 1 and not p.exact for p in pairs)


def test_look_alikes_are_close_but_below_the_threshold(planted):
    """The look-alikes are a hard case (same tissue): they score high, just not as high as a copy."""
    ids, images, _ = planted
    alike = [(i, im) for i, im in zip(ids, images) if i.startswith("alike")]
    pairs = find_pairs(fingerprint_images([i for i, _ in alike], [im for _, im in alike]), threshold=0.9)
    same_seed = [p for p in pairs if p.a.split("_")[0] == p.b.split("_")[0]]
    assert len(same_seed) == len(pairs) == 6 and max(p.score for p in same_seed) < DEFAULT_THRESHOLD


def test_the_threshold_is_an_option(planted):
    ids, images, truth = planted
    prints = fingerprint_images(ids, images)
    assert len(find_pairs(prints, threshold=0.999)) < len(truth)  # the lossy copies drop out
    assert len(find_pairs(prints, threshold=0.5)) > len(truth)  # look-alikes come in
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(DataError, match="threshold must be in"):
            find_pairs(prints, threshold=bad)


def test_exact_duplicates_by_decoded_pixels_in_any_format(tmp_path):
    image = phantom(7)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    cv2.imwrite(str(tmp_path / "b.bmp"), image)
    cv2.imwrite(str(tmp_path / "c.png"), cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))  # colour file, same grey
    cv2.imwrite(str(tmp_path / "d.png"), phantom(8))
    flat = np.full(SIZE, 90, np.uint8)  # flat images: exact duplicates, never near ones (no structure)
    cv2.imwrite(str(tmp_path / "e.png"), flat)
    cv2.imwrite(str(tmp_path / "f.png"), flat)
    cv2.imwrite(str(tmp_path / "g.png"), flat + 10)
    prints = fingerprint((p.stem, p) for p in sorted(tmp_path.iterdir()))
    pairs = find_pairs(prints)
    assert {(p.a, p.b) for p in pairs} == {("a", "b"), ("a", "c"), ("b", "c"), ("e", "f")}
    assert all(p.exact and p.score == 1.0 for p in pairs)


def test_groups_are_connected_components():
    pairs = [Pair("a", "b", 0.99), Pair("c", "b", 0.97), Pair("d", "e", 1.0, exact=True), Pair("x", "y", 0.99)]
    assert groups("abcdef", pairs) == [["a", "b", "c"], ["d", "e"], ["f"]]  # x, y: not among the ids


def test_partners_and_the_clean_subset():
    pairs = [Pair("v1", "t1", 0.99), Pair("v2", "v3", 0.99), Pair("t2", "v4", 0.98), Pair("v5", "u1", 1.0, exact=True)]
    val, train = ["v1", "v2", "v3", "v4", "v5", "v6"], ["t1", "t2", "t3"]
    assert sorted(partners(val, train, pairs)) == ["v1", "v4"]  # a val-val pair is no leak
    assert clean_ids(val, train, pairs) == ["v2", "v3", "v5", "v6"]
    assert clean_ids(val, train + ["u1"], pairs) == ["v2", "v3", "v6"]  # an unlabeled image counts as trained on
    assert clean_ids(val, ["v6"], []) == val[:5]  # an id trained on itself is not clean


def test_cross_lists_pairs_name_the_first_list_first(planted):
    ids, images, _ = planted
    a = fingerprint_images(ids[:2], images[:2])
    b = fingerprint_images(["other", "val:copy"], [phantom(300), images[1]])
    pairs = find_pairs(a, b)  # the copy itself (same pixels) first, then its original (near)
    assert [(p.a, p.b, p.exact) for p in pairs] == [("copy0_jpeg95", "val:copy", True), ("base0", "val:copy", False)]


def test_closest_pairs_picture(planted, tmp_path):
    ids, images, _ = planted
    paths = {}
    for i, image in zip(ids[:4], images[:4]):
        paths[i] = tmp_path / f"{i}.png"
        cv2.imwrite(str(paths[i]), image)
    pairs = find_pairs(fingerprint(paths.items()))
    picture = closest_pairs_image(pairs, paths, count=4, side=64, columns=2)
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.shape[1] == 2 * (2 * 64 + 4) + 3 * 4
    assert closest_pairs_image([], paths).shape[2] == 3  # nothing found: a blank picture, no error


@pytest.mark.parametrize("kind", ["jpeg95", "jpeg100", "resized", "flipped", "flipped_jpeg"])
def test_lossy_resized_and_mirrored_val_copies_in_an_unlabeled_folder_are_refused(tmp_path, kind):
    """Issue 33, item 2: the provenance check used to compare exact pixels only."""
    from dataloaders.phantom import make_phantom_dataset

    data = tmp_path / "ph"
    ids = make_phantom_dataset(data, num_images=9, preview_count=0)
    (data / "ph_train1.txt").write_text("\n".join(ids[:6]) + "\n")
    (data / "ph_val1.txt").write_text("\n".join(ids[6:]) + "\n")
    own = tmp_path / "own"
    own.mkdir()
    for k in range(3):  # images of the training list, harmless
        cv2.imwrite(str(own / f"train{k}.png"), cv2.imread(str(data / "images" / f"{ids[k]}.png"), cv2.IMREAD_GRAYSCALE))
    assert len(load_run_data(data, 1, unlabeled_dirs=[own]).unlabeled) == 3 + 3
    val_image = cv2.imread(str(data / "images" / f"{ids[7]}.png"), cv2.IMREAD_GRAYSCALE)
    copy = COPIES[kind](val_image, 0)
    cv2.imwrite(str(own / "mine.jpg" if kind.startswith("jpeg") else own / "mine.png"), copy,
                [cv2.IMWRITE_JPEG_QUALITY, int(kind[4:])] if kind.startswith("jpeg") else [])
    with pytest.raises(DataError, match=rf"holds 1 copy of images this run evaluates .* e.g. mine\.(jpg|png) = "
                                        rf"val image '{re.escape(ids[7])}' \(near-duplicate, score"):
        load_run_data(data, 1, unlabeled_dirs=[own])


def test_clean_section_of_results_md():
    from protocol.clean_subset import clean_fields, clean_section

    metrics = {"images": 10, "iou": 0.5,
               "clean_subset": {"images": 7, "dropped": 3, "iou": 0.4, "dice": 0.6, "threshold": 0.97}}
    fields = clean_fields(metrics)
    assert (fields["val_images"], fields["clean_images"], fields["clean_iou"], fields["clean_hd95"]) == (10, 7, 0.4, None)
    assert clean_fields({"images": 10, "iou": 0.5}) == {}  # a predict.py run without --trained-ids
    rows = [{"arm": "a", "split": 1, "seed": s, "iou": 0.5 + s / 10, "dice": 0.7, **fields, "clean_iou": 0.4 + s / 10}
            for s in (1, 2)]
    text = clean_section(rows, ["a"])
    assert "split 1: 7 of 10 (3 dropped)" in text and "(score >= 0.97," in text
    assert "| a | 2 | 0.6500 ± 0.0707 | 0.5500 ± 0.0707 | 0.7000 ± 0.0000 | 0.6000 ± 0.0000 | n/a | n/a |" in text
    assert "| 1 | 2 | a | 10 | 0.7000 | 7 | 0.6000 |" in text
    assert clean_section([{"arm": "a", "split": 1, "iou": 0.5}], ["a"]) == ""


def test_the_memorisation_figure_is_calibrated_on_val_images_without_a_training_duplicate(tmp_path, capsys):
    from dataloaders.phantom import make_phantom_dataset
    from sample_ldm import val_thumbnails

    data = tmp_path / "ph"
    ids = make_phantom_dataset(data, num_images=8, preview_count=0)
    (data / "ph_val1.txt").write_text("".join(f"{i}\n" for i in ids[5:]))
    info = {"data_dir": str(data), "val_file": str(data / "ph_val1.txt"), "train_ids": ids[:5]}
    assert len(val_thumbnails(info)) == 3 and "calibrated on" not in capsys.readouterr().out
    picture = cv2.imread(str(data / "images" / f"{ids[1]}.png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(data / "images" / f"{ids[6]}.png"), jpeg(picture, 95))  # a val image: a training one re-encoded
    assert len(val_thumbnails(info)) == 2
    assert "calibrated on 2 of the 3 val images (1 with an exact or near-duplicate" in capsys.readouterr().out


def test_the_leak_note_gives_its_advice_only_where_a_val_id_has_a_training_copy(tmp_path):
    ids = make_phantom_dataset(tmp_path, num_images=8, size=(64, 64), preview_count=0)
    (tmp_path / "ph_train1.txt").write_text("".join(f"{i}\n" for i in ids[:6]))
    (tmp_path / "ph_val1.txt").write_text("".join(f"{i}\n" for i in ids[6:]))
    clean = leak_note(tmp_path, [1], "ph")
    assert clean == "split 1: 0 of 2 val ids have an exact or near-duplicate in ph_train1.txt"  # no advice
    for sub in ("images", "masks/0"):  # val id 7 becomes a copy of training id 1
        (tmp_path / sub / f"{ids[7]}.png").write_bytes((tmp_path / sub / f"{ids[1]}.png").read_bytes())
    (tmp_path / "ph_train2.txt").write_text("".join(f"{i}\n" for i in ids[:6]))
    (tmp_path / "ph_val2.txt").write_text(f"{ids[6]}\n")
    assert leak_note(tmp_path, [1, 2], "ph") == (
        "split 1: 1 of 2 val ids have an exact or near-duplicate in ph_train1.txt; "
        f"split 2: 0 of 1 val ids have an exact or near-duplicate in ph_train2.txt: {DUPLICATES_ADVICE}")
