"""Per-product Prometheus metrics of the inspection replicas, exported through Ray's metrics agent.

Each node's agent serves them with Ray's own at ``http://<node>:<metrics export port>/metrics`` (port: ``ray start
--metrics-export-port``, or ``MetricsExportPort`` of ``ray.nodes()``); on Kubernetes scrape the Ray pods as KubeRay
documents (PodMonitor). Names (Ray prefixes ``ray_``):

* ``ssn_inspections_total{product, decision}``: answered inspections, ``decision`` anomalous or normal; the
  anomalous rate is ``rate(...{decision="anomalous"}) / rate(...)``;
* ``ssn_inspection_errors_total{product, code}``: answers with an error, by the error code of docs/http-api.md;
* ``ssn_inspection_latency_ms{product}``: time from the request to the answer, in ms (histogram);
* ``ssn_inspection_score{product}``: the scores (histogram over [0, 1] in 0.05 steps), what `jobs/drift.py`
  compares offline.
"""

from __future__ import annotations

LATENCY_BOUNDARIES_MS = [5, 10, 20, 35, 50, 75, 100, 150, 250, 400, 650, 1000, 2000, 5000, 10000]
SCORE_BOUNDARIES = [round(0.05 * i, 2) for i in range(1, 20)]


class InspectionMetrics:
    """The replica's metric objects (made inside the replica's process, as Ray requires)."""

    def __init__(self) -> None:
        from ray.util import metrics

        self.inspections = metrics.Counter("ssn_inspections_total", description="answered inspections",
                                           tag_keys=("product", "decision"))
        self.errors = metrics.Counter("ssn_inspection_errors_total", description="inspections answered with an error",
                                      tag_keys=("product", "code"))
        self.latency = metrics.Histogram("ssn_inspection_latency_ms", description="request to answer, ms",
                                         boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("product",))
        self.scores = metrics.Histogram("ssn_inspection_score", description="anomaly scores",
                                        boundaries=SCORE_BOUNDARIES, tag_keys=("product",))

    def answered(self, product: str, score: float, anomalous: bool, latency_ms: float) -> None:
        tags = {"product": product}
        self.inspections.inc(1.0, tags={**tags, "decision": "anomalous" if anomalous else "normal"})
        self.latency.observe(latency_ms, tags=tags)
        self.scores.observe(score, tags=tags)

    def failed(self, product: str, code: str) -> None:
        """`product`: a loaded product's name, or "-" (a name from the client would make label values unbounded)."""
        self.errors.inc(1.0, tags={"product": product, "code": code})
