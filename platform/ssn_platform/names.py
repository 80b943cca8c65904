"""Names every part of the platform shares, in one place: product names, the MLflow names derived from them, and
the registry aliases. Nothing here imports Ray, MLflow or boto3."""

from __future__ import annotations

import re

# A product: letters, digits, '.', '_', '-', at most 100 characters, starting with a letter or digit. The dataset
# store, the job configs and the endpoint's routes all accept exactly these.
PRODUCT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

# Registry aliases of `ssn-<product>`: the served version, the one before it (rollback), and the transient alias of
# a champion being demoted while aliases move (`ssn_platform.aliases`).
CHAMPION = "champion"
PREVIOUS = "previous"
DEMOTING = "demoting"


def registered_model_name(product: str) -> str:
    """The registered model of a product's versions, and its default MLflow experiment."""
    return f"ssn-{product}"


def promotions_experiment(product: str) -> str:
    return f"{registered_model_name(product)}-promotions"
