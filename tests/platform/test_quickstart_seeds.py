"""The quickstart's multi-seed figure without --seeds: said, not trained, when no seed can change it."""

import pytest

from ssn_platform.quickstart import QuickstartSettings, _seed_free_figure
from ssn_platform.stackenv import repo_root


@pytest.fixture(scope="module")
def elpv_cells(tmp_path_factory):
    from supersimplenet.elpv import export_elpv

    return export_elpv(tmp_path_factory.mktemp("elpv"), split_file=repo_root() / QuickstartSettings().split_file)


TRAINED = {"test_metrics": {"image_auroc": 0.9125}}
DATASET = "s3://ssn/datasets/elpv/abc/manifest.json"


def test_the_memory_recipe_reports_its_own_figure_for_every_seed_with_std_zero(elpv_cells, capsys):
    figure = _seed_free_figure(QuickstartSettings(), elpv_cells, DATASET, {}, TRAINED)
    assert figure == {"metrics": {"image_auroc_mean": 0.9125, "image_auroc_std": 0.0}}
    line = capsys.readouterr().out
    assert "test image AUROC 0.912 +- 0.000 over any seeds" in line and "400 normal training cells" in line


@pytest.mark.parametrize(
    "override",
    [
        "model.image_score=map_top1",  # the heads' map: trained, so the seed reaches it
        "model.memory_max_patches=25599",  # 400 cells x 64 patches = 25,600: a seeded subset is kept
    ],
)
def test_a_recipe_a_seed_can_change_gets_no_seed_free_figure(elpv_cells, capsys, override):
    settings = QuickstartSettings(overrides=(override,))
    assert _seed_free_figure(settings, elpv_cells, DATASET, {}, TRAINED) is None
    assert capsys.readouterr().out == ""
