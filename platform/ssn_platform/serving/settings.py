"""The inspection service's options: `ServeSettings` (``args`` of `build_app`, the Serve config file, or `deploy`)."""

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ServeSettings:
    """Options of the application (``args`` of `build_app`, the Serve config file, or `deploy`).

    Request limits: max_bytes (body), max_pixels (width x height, decompression bombs), max_side (either side);
    max_pixels_in_flight, the replica's budget: the pixels of all images it holds decoded at once (a float32 RGB
    image takes about 20 bytes per pixel while it is decoded and converted); a request whose image would exceed it
    is answered 503 with ``Retry-After`` before it is decoded.
    Models: max_models_per_replica (LRU), refresh_s (champion polling), negative_cache_s (how long an unknown
    product or missing champion is remembered), load_backoff_s (how long a champion that failed to load, e.g. a
    corrupt checkpoint, is answered 503 from memory before the replica downloads it again), device ("auto", "cpu",
    "cuda"), torch_threads (0: leave as is), access_log (Serve's line per request in the replica's log; the
    Prometheus metrics count and time every request either way).
    Load: max_queued_requests (requests waiting for a replica beyond max_ongoing_requests; more get 503 with
    ``Retry-After: retry_after_s`` from Serve, never an unbounded queue), request_timeout_s (Serve's HTTP proxy
    answers 408 after it; the `serve deploy` file sets it under http_options, `deploy` from here).
    Batching: batching on/off, max_batch_size, batch_wait_timeout_s (continuous batching, `serving.batching`: a
    batch is formed when the model is free; a lone request waits at most batch_wait_timeout_s for company),
    inference_threads (batches the replica runs at once, each on its own thread; with 2, set torch_threads so
    that inference_threads x torch_threads does not exceed the replica's cores).
    Deployment: num_replicas (an int, or "auto" with min_replicas/max_replicas/target_ongoing_requests),
    max_ongoing_requests, num_cpus and num_gpus per replica, mlflow_tracking_uri (default: the environment's).
    Access: api_keys_file, the YAML file of hashed API keys on the replica's node (default: the environment's
    SSN_SERVE_KEYS_FILE; `ssn_platform.serving.auth`); without one every inspection is refused.
    Review (`ssn_platform.serving.review`): review_bucket (None: nothing is kept), review_band (keep images whose
    score is within this distance of the threshold), review_sample (the share of those kept, 0-1), review_flagged
    (also keep every image flagged anomalous), review_split (the split published labels join).
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_side: int = 16384
    max_pixels_in_flight: int = 2 * 4096 * 4096
    max_models_per_replica: int = 4
    refresh_s: float = 10.0
    negative_cache_s: float = 2.0
    load_backoff_s: float = 30.0
    device: str = "auto"
    precision: str = "fp32"
    torch_threads: int = 0
    access_log: bool = True
    batching: bool = True
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.005
    inference_threads: int = 1
    num_replicas: int | str = 1
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 4.0
    max_ongoing_requests: int = 32
    max_queued_requests: int = 64
    retry_after_s: float = 1.0
    request_timeout_s: float = 30.0
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    mlflow_tracking_uri: str | None = None
    api_keys_file: str | None = None
    review_bucket: str | None = None
    review_band: float = 0.05
    review_sample: float = 1.0
    review_flagged: bool = False
    review_split: str = "val"

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"serving settings: {message}")

        check(self.max_bytes > 0, f"max_bytes must be > 0, got {self.max_bytes}")
        check(
            isinstance(self.inference_threads, int) and 1 <= self.inference_threads <= 16,
            f"inference_threads must be an integer in [1, 16], got {self.inference_threads!r}",
        )
        check(self.review_band >= 0, f"review_band must be >= 0, got {self.review_band}")
        check(0 <= self.review_sample <= 1, f"review_sample must be in [0, 1], got {self.review_sample}")
        check(
            self.review_split in ("train", "val", "test"),
            f"review_split must be train, val or test, got {self.review_split!r}",
        )
        check(self.max_pixels > 0 and self.max_side > 0, "max_pixels and max_side must be > 0")
        check(
            self.max_pixels_in_flight >= self.max_pixels,
            f"max_pixels_in_flight ({self.max_pixels_in_flight}) "
            f"must be >= max_pixels ({self.max_pixels}), or no image of the allowed size could be served",
        )
        check(self.max_models_per_replica >= 1, "max_models_per_replica must be >= 1")
        check(self.refresh_s > 0, f"refresh_s must be > 0, got {self.refresh_s}")
        check(self.negative_cache_s >= 0, "negative_cache_s must be >= 0")
        check(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}")
        check(self.precision in ("fp32", "bf16"), f"precision must be fp32 or bf16, got {self.precision!r}")
        check(self.max_batch_size >= 1, "max_batch_size must be >= 1")
        check(self.batch_wait_timeout_s >= 0, "batch_wait_timeout_s must be >= 0")
        check(
            self.num_replicas == "auto" or (isinstance(self.num_replicas, int) and self.num_replicas >= 1),
            f"num_replicas must be a positive int or 'auto', got {self.num_replicas!r}",
        )
        check(1 <= self.min_replicas <= self.max_replicas, "need 1 <= min_replicas <= max_replicas")
        check(self.max_ongoing_requests >= 1, "max_ongoing_requests must be >= 1")
        check(self.max_queued_requests >= 1, f"max_queued_requests must be >= 1, got {self.max_queued_requests}")
        check(self.retry_after_s >= 0, f"retry_after_s must be >= 0, got {self.retry_after_s}")
        check(self.request_timeout_s > 0, f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        check(self.load_backoff_s >= 0, f"load_backoff_s must be >= 0, got {self.load_backoff_s}")
        check(self.num_cpus >= 0 and self.num_gpus >= 0, "num_cpus and num_gpus must be >= 0")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "ServeSettings":
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"serving settings: unknown option(s) {unknown}; known: {sorted(known)}")
        for f in dataclasses.fields(cls):  # strings from a config file or the command line
            kind = {int: "int", float: "float", bool: "bool"}.get(f.type, f.type)
            if f.name in values and isinstance(values[f.name], str) and kind in ("int", "float", "bool"):
                raw = values[f.name]
                try:
                    values[f.name] = (
                        raw.lower() in ("1", "true", "yes", "on")
                        if kind == "bool"
                        else int(raw)
                        if kind == "int"
                        else float(raw)
                    )
                except ValueError:
                    article = "an" if kind == "int" else "a"
                    raise ValueError(f"serving settings: {f.name} must be {article} {kind}, got {raw!r}") from None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = [
    "ServeSettings",
]
