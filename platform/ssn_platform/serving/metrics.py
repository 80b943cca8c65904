"""Per-product Prometheus metrics of the inspection replicas, exported through Ray's metrics agent, and the
per-request stage timer behind the ``Server-Timing`` header and the stage histogram.

Each node's agent serves them with Ray's own at ``http://<node>:<metrics export port>/metrics`` (port: ``ray start
--metrics-export-port``, or ``MetricsExportPort`` of ``ray.nodes()``); on Kubernetes scrape the Ray pods as KubeRay
documents (PodMonitor). Names (Ray prefixes ``ray_``):

* ``ssn_inspections_total{product, decision}``: answered inspections, ``decision`` anomalous or normal; the
  anomalous rate is ``rate(...{decision="anomalous"}) / rate(...)``;
* ``ssn_inspection_errors_total{product, code}``: answers with an error, by the error code of docs/http-api.md;
* ``ssn_inspection_latency_ms{product}``: time from the request to the answer, in ms (histogram);
* ``ssn_inspection_stage_ms{product, stage}``: the same time split by stage (read, model_lookup, decode, infer =
  queue + model, post: `StageTimer`; histogram), where a slow endpoint spends it;
* ``ssn_inspection_score{product}``: the scores (histogram over [0, 1] in 0.05 steps), what `jobs/drift.py`
  compares offline.
"""

from __future__ import annotations

import time

from ray.util import metrics

LATENCY_BOUNDARIES_MS = [5, 10, 20, 35, 50, 75, 100, 150, 250, 400, 650, 1000, 2000, 5000, 10000]
STAGE_BOUNDARIES_MS = [0.5, 1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 400, 650, 1000, 2000, 5000]
SCORE_BOUNDARIES = [round(0.05 * i, 2) for i in range(1, 20)]


class InspectionMetrics:
    """The replica's metric objects (made inside the replica's process, as Ray requires)."""

    def __init__(self) -> None:
        self.inspections = metrics.Counter(
            "ssn_inspections_total", description="answered inspections", tag_keys=("product", "decision")
        )
        self.errors = metrics.Counter(
            "ssn_inspection_errors_total",
            description="inspections answered with an error",
            tag_keys=("product", "code"),
        )
        self.latency = metrics.Histogram(
            "ssn_inspection_latency_ms",
            description="request to answer, ms",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("product",),
        )
        self.stage = metrics.Histogram(
            "ssn_inspection_stage_ms",
            description="one stage of an inspection, ms",
            boundaries=STAGE_BOUNDARIES_MS,
            tag_keys=("product", "stage"),
        )
        self.scores = metrics.Histogram(
            "ssn_inspection_score", description="anomaly scores", boundaries=SCORE_BOUNDARIES, tag_keys=("product",)
        )

    def answered(
        self, product: str, score: float, anomalous: bool, latency_ms: float, stages: dict[str, float] | None = None
    ) -> None:
        tags = {"product": product}
        self.inspections.inc(1.0, tags={**tags, "decision": "anomalous" if anomalous else "normal"})
        self.latency.observe(latency_ms, tags=tags)
        for stage, ms in (stages or {}).items():
            self.stage.observe(ms, tags={**tags, "stage": stage})
        self.scores.observe(score, tags=tags)

    def failed(self, product: str, code: str) -> None:
        """`product`: a loaded product's name, or "-" (a name from the client would make label values unbounded)."""
        self.errors.inc(1.0, tags={"product": product, "code": code})


class StageTimer:
    """Where one inspection's time went, in ms per stage, answered as a ``Server-Timing`` header (W3C) and
    observed by the stage histogram (serving.metrics).

    Stages: ``read`` (authentication and the body), ``model_lookup`` (the champion served for the product),
    ``decode`` (header check and pixels), ``infer`` (from the decoded image to its score: ``queue``, the wait for
    a batch and the inference thread, plus ``model``, the batch's forward pass, with the batch size as its
    description), ``post`` (threshold decision, regions, PNGs). The time before the replica (Serve's proxy, the
    network) is what a client measures beyond ``total``."""

    def __init__(self, started: float) -> None:
        self._last = started
        self._started = started
        self.stages: dict[str, float] = {}
        self.batch = 0

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = (now - self._last) * 1000.0
        self._last = now
        if stage == "infer" and "model" in self.stages:  # the header and the histogram both get the wait
            self.stages["queue"] = max(0.0, self.stages["infer"] - self.stages["model"])

    def model(self, model_ms: float, batch: int) -> None:
        self.stages["model"], self.batch = model_ms, batch

    def header(self) -> str:
        parts = [
            f"{name};dur={ms:.2f}" + (f';desc="batch {self.batch}"' if name == "model" else "")
            for name, ms in self.stages.items()
        ]
        return ", ".join(parts + [f"total;dur={(time.perf_counter() - self._started) * 1000.0:.2f}"])


def parse_server_timing(header: str) -> dict[str, float]:
    """``name;dur=ms[;desc=...], ...`` (a Server-Timing header, as `StageTimer.header` writes it) -> {name: ms}."""
    out = {}
    for entry in filter(None, (part.strip() for part in header.split(","))):
        name, *params = entry.split(";")
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "dur":
                out[name.strip()] = float(value)
    return out
