"""Every prediction path (predict_images, train.predict) runs the folded fast model; fp32 matches the reference."""

import numpy as np
import pytest
import torch
from PIL import Image

from supersimplenet import fast as fast_module
from supersimplenet.layouts import read_layout
from supersimplenet.loading import DefectDataset
from supersimplenet.fast import FastSuperSimpleNet
from supersimplenet.inference import inference_model, predict_images, preprocess
from supersimplenet.train import eval_loader, predict

from test_fast import lite0_model, normalise, weld_images  # tests/model is on sys.path (pytest's prepend mode)

SIZE = (128, 72)


@pytest.fixture(scope="module")
def model(weld_root):
    images = normalise(weld_images(weld_root, SIZE), "efficientnet_lite0")
    return lite0_model(icpr=False, images=images, size=SIZE)


@pytest.fixture(scope="module")
def weld_files(weld_root):
    files = sorted((weld_root / "test" / "good").glob("*.png"))[:2]
    return files + sorted((weld_root / "test" / "defective").glob("*.png"))[:3]


def reference(model, images):
    with torch.inference_mode():
        out = model.eval()(preprocess(model, images))
    return out.score.numpy(), out.anomaly_map[:, 0].numpy()


def count_folds(monkeypatch):
    calls = []
    original = FastSuperSimpleNet.from_model.__func__

    def spy(cls, model, **options):
        calls.append(options)
        return original(cls, model, **options)

    monkeypatch.setattr(fast_module.FastSuperSimpleNet, "from_model", classmethod(spy))
    return calls


def test_predict_images_runs_the_fast_path_and_matches_the_reference(model, weld_files, monkeypatch):
    images = [Image.open(path) for path in weld_files]
    folded = inference_model(model)
    assert isinstance(folded, FastSuperSimpleNet) and inference_model(folded) is folded
    calls = count_folds(monkeypatch)
    scores, maps = predict_images(model, images)
    assert len(calls) == 1  # a reference model is folded once per call
    fast_scores, fast_maps = predict_images(folded, images)
    assert len(calls) == 1  # a folded model is used as is
    np.testing.assert_array_equal(scores, fast_scores)
    np.testing.assert_array_equal(maps, fast_maps)
    ref_scores, ref_maps = reference(model, images)
    assert maps.shape == ref_maps.shape == (len(images), *SIZE)
    assert np.abs(scores - ref_scores).max() <= 1e-5 and np.abs(maps - ref_maps).max() <= 1e-5
    assert scores.std() > 1e-3  # scores spread: the comparison is not between saturated sigmoids


def test_train_predict_folds_once_and_leaves_the_model_as_it_was(model, weld_root, monkeypatch):
    samples = [s for s in read_layout(weld_root, layout="mvtec") if s.split == "test"][:10]
    dataset = DefectDataset(
        root=weld_root,
        samples=samples,
        image_size=SIZE,
        mean=model.mean.flatten().tolist(),
        std=model.std.flatten().tolist(),
    )
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = count_folds(monkeypatch)
    predictions = predict(model, eval_loader(dataset, batch_size=4), device=torch.device("cpu"))
    assert len(calls) == 1 and calls[0] == {"dtype": torch.float32}
    assert model.training  # the caller's mode is kept (training resumes after validation)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    with torch.inference_mode():
        out = model(torch.stack([dataset[i]["image"] for i in range(len(dataset))]))
    assert np.abs(predictions.scores - out.score.numpy()).max() <= 1e-5
    assert np.abs(predictions.maps - out.anomaly_map[:, 0].numpy()).max() <= 1e-5
    assert predictions.labels.tolist() == [s.label for s in samples]


def test_bf16_precision_stays_close_to_fp32(model, weld_files):
    images = [Image.open(path) for path in weld_files]
    fp32, _ = predict_images(model, images)
    bf16, _ = predict_images(inference_model(model, precision="bf16"), images)
    assert 0 < np.abs(bf16 - fp32).max() <= 2e-2


def test_inference_model_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="precision must be one of"):
        inference_model(model, precision="fp16")
    with pytest.raises(ValueError, match="runs in torch.float32, not bf16"):
        inference_model(inference_model(model), precision="bf16")
    with pytest.raises(TypeError, match="expected a SuperSimpleNet"):
        inference_model(torch.nn.Linear(2, 2))
