"""engine/figures.py: the slices go through the label, best and worst cases come first, the PNGs are written."""

import numpy as np
import pytest

from tcurlora_seg.engine.figures import MAX_ROWS, _chosen, case_slices, plot_dice_per_case, plot_overlays, with_image


def volume_with_blob(centre, shape=(20, 24, 28)):
    label = np.zeros(shape, dtype=np.int16)
    x, y, z = centre
    label[x - 2:x + 3, y - 2:y + 3, z - 2:z + 3] = 1
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32) + 3 * label
    return image, label


def test_slices_cut_through_the_labels_largest_cross_section_in_three_planes():
    image, label = volume_with_blob((5, 17, 9))
    label[14:16, 2:4, 20:22] = 1  # a second, smaller lesion: not where the slices go
    cut = with_image(case_slices("a", 50.0, label, np.zeros_like(label)), image)
    assert [s.shape for s in cut.image] == [(24, 28), (20, 28), (20, 24)]
    assert all(s.sum() == 25 for s in cut.label)  # the 5x5 cross-section of the 5³ blob in every plane
    np.testing.assert_array_equal(cut.image[0], image[5])  # the blob's middle slice among its equal ones
    np.testing.assert_array_equal(cut.image[2], image[:, :, 9])
    empty = with_image(case_slices("b", 0.0, np.zeros_like(label), np.zeros_like(label)), image)
    np.testing.assert_array_equal(empty.image[2], image[:, :, 14])  # no label: the volume's centre


def test_best_and_worst_case_come_first_then_the_others_up_to_the_row_limit():
    image, label = volume_with_blob((10, 12, 14))
    cases = [case_slices(f"c{i}", dice, label, label) for i, dice in enumerate([40.0, 90.0, 10.0, 60.0, 70.0])]
    chosen = _chosen(cases)
    assert [(c.case_id, mark) for c, mark in chosen] == [("c1", "best"), ("c2", "worst"), ("c0", ""), ("c3", "")]
    assert len(chosen) == MAX_ROWS
    assert [mark for _, mark in _chosen(cases[:1])] == ["only case"]


@pytest.mark.parametrize("n", [1, 6])
def test_pictures_are_written_as_png(tmp_path, n):
    image, label = volume_with_blob((10, 12, 14))
    cases = [case_slices(f"c{i}", 15.0 * i, label, np.roll(label, i, axis=0)) for i in range(n)]
    read = []  # the image is read for the shown cases only
    picture = plot_overlays(cases, tmp_path / "overlays.png", "test", image_of=lambda c: read.append(c.case_id) or image)
    assert picture.read_bytes().startswith(b"\x89PNG") and sorted(read) == sorted(c.case_id for c, _ in _chosen(cases))
    path = plot_dice_per_case([c.case_id for c in cases], [c.dice for c in cases], tmp_path / "dice.png", "test")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert plot_overlays([], tmp_path / "none.png", "test") is None and not (tmp_path / "none.png").exists()
