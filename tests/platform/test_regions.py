"""Defect regions and maps at the image's own size (`ssn_platform.regions`): golden boxes and areas."""

from __future__ import annotations

import numpy as np
import pytest

from ssn_platform.regions import defect_regions, map_at


def two_blobs() -> np.ndarray:
    """A 16x32 map: a 3x4 blob of 0.9 (one pixel 0.95) and a diagonal pair of 0.6 (8-connected: one region)."""
    anomaly_map = np.full((16, 32), 0.1, dtype=np.float32)
    anomaly_map[2:5, 4:8] = 0.9
    anomaly_map[3, 5] = 0.95
    anomaly_map[10, 20] = anomaly_map[11, 21] = 0.6
    return anomaly_map


def test_regions_of_a_map_at_the_image_size_are_exact_and_sorted_by_their_maximum():
    regions, total = defect_regions(two_blobs(), 0.5, 32, 16)
    assert total == 2
    assert [(r["x0"], r["y0"], r["x1"], r["y1"], r["area_pixels"]) for r in regions] == [
        (4, 2, 8, 5, 12.0),
        (20, 10, 22, 12, 2.0),
    ]
    assert regions[0]["max_score"] == pytest.approx(0.95) and regions[1]["max_score"] == pytest.approx(0.6)
    assert regions[0]["mean_score"] == pytest.approx((11 * 0.9 + 0.95) / 12)
    assert regions[0]["area_percent"] == pytest.approx(100 * 12 / (32 * 16), abs=1e-4)


def test_regions_of_a_model_sized_map_are_scaled_to_the_image():
    regions, _ = defect_regions(two_blobs(), 0.5, 320, 80)  # the image is 10x wider and 5x taller than the map
    assert (regions[0]["x0"], regions[0]["y0"], regions[0]["x1"], regions[0]["y1"]) == (40, 10, 80, 25)
    assert regions[0]["area_pixels"] == pytest.approx(12 * 50)
    assert regions[0]["area_percent"] == pytest.approx(100 * 12 / (32 * 16), abs=1e-4)


def test_no_pixel_over_the_threshold_means_no_region_and_the_list_is_capped():
    assert defect_regions(two_blobs(), 0.99, 32, 16) == ([], 0)
    checker = np.zeros((20, 20), dtype=np.float32)
    checker[::2, ::4] = 1.0  # 50 isolated pixels (not 8-connected: every other row, every fourth column)
    regions, total = defect_regions(checker, 0.5, 20, 20, max_regions=8)
    assert (len(regions), total) == (8, 50)


def test_map_at_resamples_to_the_image_and_keeps_a_map_that_already_fits():
    anomaly_map = two_blobs()
    assert map_at(anomaly_map, 32, 16) is anomaly_map
    resized = map_at(anomaly_map, 96, 48)
    assert resized.shape == (48, 96) and resized.dtype == np.float32
    assert resized.max() <= 0.95 + 1e-6 and resized.min() >= 0.1 - 1e-6
    assert resized[10, 18] == pytest.approx(0.9, abs=0.05)  # inside the blob, 3x scale
