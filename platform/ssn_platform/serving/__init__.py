"""The inspection service: a Ray Serve application with a FastAPI ingress serving every product's champion.

Endpoints (OpenAPI at ``/openapi.json``, docs at ``/docs``):

* ``POST /v1/products/{product}/inspect``: the image as the raw body (``Content-Type`` image/png, image/jpeg,
  image/bmp, image/tiff or application/octet-stream) or as ``multipart/form-data`` field ``image``. Query options
  ``return_map`` (colourised anomaly heatmap, base64 PNG) and ``return_mask`` (binary mask, base64 PNG). Answers
  product, registered model and version, score in [0, 1], threshold, is_anomalous (``score >= threshold``),
  defect_area_percent (share of anomaly-map pixels ``>= threshold``, at the model's resolution) and latency_ms;
  a ``Server-Timing`` header says where the replica spent that time, stage by stage (`metrics.StageTimer`).
* ``GET /v1/products``: products with a champion (champion, previous and loaded version).
* ``GET /healthz`` (the replica answers) and ``GET /readyz`` (and reaches the MLflow registry, or holds a loaded
  champion that answers without it).

Modules: `requests` (request and answer schemas, errors, reading and decoding the image), `versions` (the
registered versions a replica serves: champion lookup, loading, batched scoring), `champions` (which version a
replica serves per product, and the champion switch), `app` (the replica class and its routes), `deployment`
(`build_app`, `deploy`, `wait_ready`), `settings` (`ServeSettings`, the application's options), `metrics`
(Prometheus metrics and the stage timer), `auth` (API keys), `review` (the review page's routes).
`build_app` is exported here for ``import_path: ssn_platform.serving:build_app`` (jobs/configs/serve.yaml); import
everything else from its module.
"""

from ssn_platform.serving.deployment import build_app

__all__ = ["build_app"]
