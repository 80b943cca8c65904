"""The per-request stage timer of the inspection replicas and its Server-Timing header (serving.metrics)."""

from __future__ import annotations

import time

import pytest


def test_the_stage_timer_header_round_trips_and_splits_the_inference_wait_into_queue_and_model():
    from ssn_platform.serving.metrics import StageTimer, parse_server_timing  # the package imports Ray

    timer = StageTimer(time.perf_counter())
    timer.mark("read")
    time.sleep(0.002)
    timer.mark("decode")
    timer.model(1.5, batch=4)
    time.sleep(0.003)
    timer.mark("infer")
    timer.mark("post")
    header = timer.header()
    assert 'model;dur=1.50;desc="batch 4"' in header
    stages = parse_server_timing(header)
    assert list(stages) == ["read", "decode", "model", "infer", "queue", "post", "total"]
    assert timer.stages["queue"] == pytest.approx(stages["queue"], abs=0.006)  # the histogram gets it too
    assert stages["decode"] >= 2.0 and stages["infer"] >= 3.0
    assert stages["queue"] == pytest.approx(stages["infer"] - 1.5, abs=0.011)
    assert stages["total"] >= stages["read"] + stages["decode"] + stages["infer"] + stages["post"] - 0.05


def test_server_timing_parsing_ignores_descriptions_and_entries_without_a_duration():
    from ssn_platform.serving.metrics import parse_server_timing

    header = 'cache;desc="hit", db;dur=53.2, app;dur=47.2;desc="batch 2", , x;dur=0'
    assert parse_server_timing(header) == {"db": 53.2, "app": 47.2, "x": 0.0}
    assert parse_server_timing("") == {}
