"""The inspection service's settings and model loading helpers, without a stack (test_serving.py runs the app)."""

from __future__ import annotations

import pytest
import torch

from supersimplenet.config import ModelConfig
from supersimplenet.inference import inference_model
from supersimplenet.model import build_model

# ssn_platform.serving imports Ray, which reads its auth settings when first imported: a module-level import here
# (at collection, before the live_stack fixture applies the stack's token) breaks every later in-process Ray
# connection of the session. Import inside the tests.


def test_settings_from_strings_and_round_trip():
    from ssn_platform.serving.settings import ServeSettings

    settings = ServeSettings.from_dict(
        {"precision": "bf16", "max_batch_size": "16", "batching": "false", "refresh_s": "2.5"}
    )
    assert (settings.precision, settings.max_batch_size, settings.batching, settings.refresh_s) == (
        "bf16",
        16,
        False,
        2.5,
    )
    assert ServeSettings.from_dict(settings.to_dict()) == settings
    assert ServeSettings().precision == "fp32"  # served scores equal offline ones unless asked otherwise


@pytest.mark.parametrize(
    "values, message",
    [
        ({"precision": "fp16"}, "precision must be fp32 or bf16, got 'fp16'"),
        ({"device": "tpu"}, "device must be auto, cpu or cuda"),
        ({"max_batch_size": "many"}, "max_batch_size must be an int, got 'many'"),
        ({"max_batchsize": 8}, "unknown option(s) ['max_batchsize']"),
        ({"num_replicas": 0}, "num_replicas must be a positive int or 'auto'"),
        ({"inference_threads": 0}, "inference_threads must be an integer in [1, 16], got 0"),
    ],
)
def test_bad_settings_name_the_culprit(values, message):
    from ssn_platform.serving.settings import ServeSettings

    with pytest.raises(ValueError) as error:
        ServeSettings.from_dict(values)
    assert message in str(error.value)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_inference_info_describes_the_folded_model(precision):
    from ssn_platform.serving.versions import inference_info

    model = build_model(ModelConfig(backbone="efficientnet_lite0", image_size=(96, 96))).eval()
    info = inference_info(inference_model(model, precision=precision))
    assert info == {"engine": "FastSuperSimpleNet", "heads": "folded", "precision": precision, "device": "cpu"}
    assert torch.equal(model.mean, inference_model(model).mean)  # normalisation travels with the folded model
