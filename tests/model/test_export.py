"""ONNX export of the whole inference graph (blur included), checked with onnxruntime on real weld images."""

import copy

import numpy as np
import onnx
import pytest
import torch

from supersimplenet.backbones import get_preset, load_backbone_weights
from supersimplenet.config import ModelConfig
from supersimplenet.loading import load_image
from supersimplenet.export import OnnxCheckError, check_onnx, export_onnx, onnx_session, run_onnx
from supersimplenet.fast import FastSuperSimpleNet
from supersimplenet.model import build_model

SIZE = (128, 128)


@pytest.fixture(scope="module")
def weld_batch(weld_root):
    files = sorted((weld_root / "test" / "good").glob("*.png"))[:1]
    files += sorted((weld_root / "test" / "defective").glob("*.png"))[:2]
    images = torch.stack([load_image(path, size=SIZE) for path in files])
    preset = get_preset("efficientnet_lite0")
    return (images - torch.tensor(preset.mean).view(1, 3, 1, 1)) / torch.tensor(preset.std).view(1, 3, 1, 1)


def lite0(icpr: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(
        backbone="efficientnet_lite0", image_size=SIZE, adapt_cls_features=icpr, image_score="map_top1"
    )
    model = build_model(config)
    load_backbone_weights(model.feature_extractor.backbone, "efficientnet_lite0", "default")
    with torch.no_grad():  # trained-like head statistics, so the exported BatchNorms are not identities
        for bn in (model.segmentation_head.layers[1], model.classification_head.block[1]):
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def reference_export(tmp_path_factory):
    model = lite0(icpr=False)
    return model, export_onnx(model, tmp_path_factory.mktemp("onnx") / "ssn.onnx")


def test_reference_graph_matches_pytorch_with_dynamic_batch(reference_export, weld_batch):
    model, path = reference_export
    graph = onnx.load(str(path)).graph
    # The blur is in the graph: two reflect pads, each feeding a convolution with a 1-D kernel (25x1, then 1x25).
    weights = {i.name: tuple(i.dims) for i in graph.initializer}
    weights.update(
        {
            n.output[0]: tuple(onnx.numpy_helper.to_array(n.attribute[0].t).shape)
            for n in graph.node
            if n.op_type == "Constant" and n.attribute[0].name == "value"
        }
    )
    reflect = [
        n.output[0]
        for n in graph.node
        if n.op_type == "Pad" and any(a.name == "mode" and a.s == b"reflect" for a in n.attribute)
    ]
    blur = [weights.get(n.input[1]) for n in graph.node if n.op_type == "Conv" and n.input[0] in reflect]
    assert blur == [(1, 1, 25, 1), (1, 1, 1, 25)]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 3):
        report = check_onnx(path, model, weld_batch[:batch], atol=1e-4)
        assert report["batch"] == batch


def test_fast_separable_graph_matches_reference(tmp_path, weld_batch):
    """The fast path's graph (BN and adaptor folded, low-resolution heads, ICPR bias map) exports too."""
    model = lite0(icpr=True)
    fast = FastSuperSimpleNet.from_model(model, heads="separable", channels_last=False)
    path = export_onnx(fast, tmp_path / "ssn_fast.onnx")
    session = onnx_session(path)
    with torch.no_grad():
        reference = model(weld_batch)
    for batch in (1, 3):
        anomaly_map, score = run_onnx(session, weld_batch[:batch])
        assert anomaly_map.shape == (batch, 1, *SIZE) and score.shape == (batch,)
        assert np.abs(anomaly_map - reference.anomaly_map[:batch].numpy()).max() <= 1e-4
        assert np.abs(score - reference.score[:batch].numpy()).max() <= 1e-4


def test_check_onnx_reports_a_mismatch(reference_export, weld_batch):
    model, path = reference_export
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.segmentation_head.layers[-1].weight.neg_()  # the file no longer matches the model
    with pytest.raises(OnnxCheckError, match="differs"):
        check_onnx(path, model, weld_batch[:1])
