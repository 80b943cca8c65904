"""Publishing operators' labels as a new dataset version (`ssn_platform.review.ReviewStore.publish`).

Steps: pick the base version (the product's ``latest``, else the champion's training data) -> materialise it
through the node cache -> a working folder of hard links to it plus the labelled review images (and painted masks)
under ``review/`` -> the whole list decoded and checked like an ingest (`supersimplenet.validation.check_samples`,
with the base version's empty-mask policy) -> `ssn_platform.ingest.publish_checked` (manifest last, then
``latest``) -> ``published/<version>.json`` in the review area, so an item is published once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from supersimplenet.samples import Sample
from supersimplenet.validation import check_samples
from ssn_platform.datasets import DatasetReader
from ssn_platform.ingest import publish_checked
from ssn_platform.manifest import DATASETS_ROOT, LATEST_NAME
from ssn_platform.review import PublishResult, ReviewError
from ssn_platform.s3keys import format_s3_uri, join_key
from ssn_platform.scoring import pin_version
from ssn_platform.storage import object_exists


def _base_dataset(store: Any, dataset_bucket: str, base_uri: str | None) -> str:
    if base_uri:
        return base_uri
    latest = join_key(DATASETS_ROOT, store.product, LATEST_NAME)
    if object_exists(store.client, dataset_bucket, latest):
        return format_s3_uri(dataset_bucket, latest)
    tags = pin_version(store.product, None)[2]
    if not tags.get("dataset"):
        raise ReviewError(f"product {store.product!r} has no dataset version to add the labels to", 409)
    return tags["dataset"]


def _link_tree(source: Path, target: Path) -> None:
    """`target` as hard links to `source`'s files (copies where links fail: another file system)."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link, symlinks=False)


def publish_labels(store: Any, *, dataset_bucket: str, split: str, base_uri: str | None) -> Any:
    if split not in ("train", "val", "test"):
        raise ReviewError(f"split must be train, val or test, got {split!r}")
    done = store.published_items()
    labelled = [item for item in store.items(limit=100000) if item["label"] and item["id"] not in done]
    if not labelled:
        raise ReviewError(f"no labelled review item of {store.product!r} is waiting to be published", 409)
    base = _base_dataset(store, dataset_bucket, base_uri)
    reader = DatasetReader(base)
    root, samples = reader.materialize()
    samples = list(samples)
    with tempfile.TemporaryDirectory(prefix="ssn-review-") as directory:
        work = Path(directory) / "dataset"
        _link_tree(root, work)
        (work / "review").mkdir(exist_ok=True)
        added: dict[str, int] = {"normal": 0, "defective": 0}
        for item in labelled:
            ext = item["image"].rsplit(".", 1)[-1]
            image = f"review/{item['id']}.{ext}"
            (work / image).write_bytes(store.file(item["id"], "image")[0])
            defective = item["label"]["label"] == "defective"
            mask = None
            if item["label"].get("mask"):
                mask = f"review/{item['id']}_mask.png"
                (work / mask).write_bytes(store._get(f"labels/{item['id']}.mask.png"))
            samples.append(
                Sample(
                    image=image,
                    mask=mask,
                    label=int(defective),
                    split=split,
                    segmented=(not defective) or mask is not None,
                    defect_type="review" if defective else "",
                )
            )
            added[item["label"]["label"]] += 1
        policy = reader.manifest.empty_masks.get("policy", "error")
        checked = check_samples(work, samples, empty_masks=policy)
        result = publish_checked(
            work,
            checked,
            product=store.product,
            bucket=dataset_bucket,
            empty_masks=policy,
            layout_meta={
                "name": "review",
                "base": base,
                "base_version": reader.version,
                "review": format_s3_uri(store.bucket, store.prefix),
            },
        )
    ids = tuple(item["id"] for item in labelled)
    store._put(
        f"published/{result.version}.json",
        json.dumps(
            {
                "version": result.version,
                "dataset": result.uri,
                "base": base,
                "base_version": reader.version,
                "split": split,
                "added": added,
                "items": list(ids),
            }
        ).encode(),
        "application/json",
    )
    return PublishResult(
        dataset_uri=result.uri, version=result.version, base_version=reader.version, added=added, items=ids, split=split
    )
