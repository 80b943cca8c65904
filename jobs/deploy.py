"""Deploy (or update, or remove) the inspection service on the Ray cluster, without blocking.

    python jobs/deploy.py                                   # settings from jobs/configs/serve.yaml
    python jobs/deploy.py --set refresh_s=2 --set batching=false
    python jobs/deploy.py --delete
    python jobs/deploy.py --smoke-test                      # deploys an app of its own, checks /readyz, removes it
    ray job submit --working-dir . -- python jobs/deploy.py --port 8000

Connects to the cluster (``--address``, else SSN_RAY_ADDRESS or RAY_ADDRESS: the GCS address the local stack's
``env`` exports), starts Serve with HTTP on 127.0.0.1:SSN_SERVE_PORT
(``--host``/``--port``), deploys ``ssn_platform.serving:build_app`` with the ``args`` of the config file's first
application plus ``--set key=value`` overrides, waits until ``/readyz`` answers and prints the URLs as JSON.
The application keeps running after this script exits (Serve is detached); ``--delete`` removes it. The replicas
get MLFLOW_TRACKING_URI from this environment (eval "$(infra/local/stack env)").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

import _bootstrap  # noqa: F401  (puts model/ and platform/ on sys.path for plain checkouts)

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "serve.yaml"


def load_settings(path: Path, overrides: list[str]) -> tuple[dict, dict]:
    """(args, application entry) of the config's first application, with `key=value` overrides (YAML values)."""
    tree = yaml.safe_load(path.read_text()) if path else {}
    applications = (tree or {}).get("applications") or [{}]
    application = applications[0]
    settings = dict(application.get("args") or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r} is not of the form key=value")
        settings[key] = yaml.safe_load(raw) if raw else None
    return settings, application


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config file (its args are used)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting of ssn_platform.serving.settings.ServeSettings",
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster (GCS) address; default SSN_RAY_ADDRESS, else RAY_ADDRESS"
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host of the Serve proxy (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default SSN_SERVE_PORT or 8000)")
    parser.add_argument("--name", default=None, help="application name (default: the config's, else ssn)")
    parser.add_argument("--route-prefix", default=None, help="route prefix (default: the config's, else /)")
    parser.add_argument("--delete", action="store_true", help="remove the application instead")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for /readyz")
    parser.add_argument(
        "--smoke-test",
        action="store_true",
        help="deploy the config as application ssn-smoke under /smoke, wait for /readyz, remove it",
    )
    args = parser.parse_args(argv)

    from ssn_platform.serving.deployment import deploy, wait_ready
    from ssn_platform.serving.settings import ServeSettings
    from ssn_platform.services import PlatformError, connect_ray

    try:
        settings, application = load_settings(args.config, args.overrides)
        name = args.name or application.get("name") or "ssn"
        prefix = args.route_prefix or application.get("route_prefix") or "/"
        if args.smoke_test:
            name, prefix = "ssn-smoke", "/smoke"
        if args.delete:
            from ray import serve

            connect_ray(args.address)
            serve.delete(name)
            print(json.dumps({"deleted": name}))
            return 0
        ServeSettings.from_dict(settings)  # fail before touching the cluster
        url = deploy(settings, address=args.address, name=name, route_prefix=prefix, host=args.host, port=args.port)
        ready = wait_ready(url, timeout=args.timeout)
        if args.smoke_test:
            from ray import serve

            serve.delete(name)
    except (PlatformError, ValueError, OSError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "app": name,
                "url": url,
                "inspect": f"{url}/v1/products/{{product}}/inspect",
                "docs": f"{url}/docs",
                "registry": ready.get("registry"),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
