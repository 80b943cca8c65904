"""Which version of each product a replica serves, and the champion switch (`ChampionSwitch`, mixed into the
replica, `ssn_platform.serving.app.InspectorReplica`).

Loading: the first request for a product looks up its ``champion`` alias (and threshold tag) in the registry and
loads that version through the replica's multiplexed loader (`get_product_model`, an LRU of
``max_models_per_replica`` products). Only a servable champion reaches the loader: an unknown product or one
without a champion answers 404 and is remembered for ``negative_cache_s``, a champion without a calibrated
threshold answers 409, so a bad product name never evicts a served one. A champion that fails to load answers 503
with Retry-After, and the same version is not downloaded again for ``load_backoff_s``.

Champion switch: every ``refresh_s`` seconds a background task reads each loaded product's ``champion`` alias (and
its threshold tag); when either changed, it loads the new version completely (warm-up included) and only then swaps
it in (one of the product's last two versions, still loaded, is swapped back at once: a threshold change alone, or
a rollback). A request uses the version it started with, so no request fails during a switch, and the new version
is served at most ``refresh_s`` plus one load time after the alias moved. A product whose alias disappears answers
404. A refresh that fails keeps serving what is loaded and tries again next round.

Like the app module, this module has no `from __future__ import annotations`: Serve pickles the ingress class,
which inherits these methods, and their annotations must resolve at module level.
"""

import asyncio
import dataclasses
import logging
import math
import time

from ssn_platform.names import PRODUCT_RE
from ssn_platform.serving.requests import ApiError
from ssn_platform.serving.versions import LoadedVersion, ProductModel, champion_info, load_version
from ssn_platform.thresholds import threshold_from_tags

log = logging.getLogger("ray.serve")


class ChampionSwitch:
    """The replica's products and versions (module docstring). The replica sets what these methods share:
    `settings`, `_io_pool` (registry and download calls), `_holders` (product -> `ProductModel`), `_absent` and
    `_failed` (the 404 and load-failure caches), `_refresher` and `_switches`; its Serve subclass defines
    `get_product_model`, the multiplexed loader, which calls `_load_product_model`."""

    async def _load_product_model(self, product: str) -> ProductModel:
        loop = asyncio.get_running_loop()
        name, version, tags = await loop.run_in_executor(self._io_pool, champion_info, product)
        loaded = await loop.run_in_executor(
            self._io_pool,
            lambda: load_version(
                product, name, version, tags, device=self.settings.device, precision=self.settings.precision
            ),
        )
        holder = ProductModel(product, loaded)
        self._holders[product] = holder
        self._ensure_refresher()
        log.info("loaded %s version %s (threshold %.6g)", name, version, loaded.threshold)
        return holder

    async def _serving_version(self, product: str) -> LoadedVersion:
        if not PRODUCT_RE.match(product or ""):
            raise ApiError(
                404, "unknown_product", "invalid product name (letters, digits, '.', '_', '-'; at most 100 characters)"
            )
        holder = self._holders.get(product)
        version = None
        if holder is None or holder.evicted:
            absent = self._absent.get(product)
            if absent is not None and absent[0] > time.monotonic():
                raise absent[1]
            try:  # only servable champions reach the loader, so a bad product never evicts a served one
                _, version, tags = await asyncio.get_running_loop().run_in_executor(
                    self._io_pool, champion_info, product
                )
                if threshold_from_tags(tags) is None:
                    raise ApiError(
                        409,
                        "no_threshold",
                        f"champion version {version} of product {product!r} has "
                        "no calibrated threshold; run jobs/calibrate.py",
                    )
            except ApiError as error:
                if error.status == 404:
                    if len(self._absent) > 4096:
                        self._absent.clear()
                    self._absent[product] = (time.monotonic() + self.settings.negative_cache_s, error)
                raise
            self._absent.pop(product, None)
            failed = self._failed.get(product)
            if failed is not None and failed[1] == version and failed[0] > time.monotonic():
                raise failed[2]  # the same champion failed to load moments ago: not downloaded again per request
        try:
            holder = await self.get_product_model(product)
        except ApiError:
            raise
        except Exception as error:  # noqa: BLE001 - download or build failure: not the client's fault
            log.exception("loading the champion of %s failed", product)
            backoff = self.settings.load_backoff_s
            answer = ApiError(
                503,
                "model_unavailable",
                f"the champion of {product!r} (version {version}) could not be loaded: "
                f"{type(error).__name__}; tried again after {backoff:g} s",
                headers={"Retry-After": str(max(1, math.ceil(backoff)))},
            )
            if version is not None and backoff > 0:
                if len(self._failed) > 4096:
                    self._failed.clear()
                self._failed[product] = (time.monotonic() + backoff, version, answer)
            raise answer from None
        self._failed.pop(product, None)
        loaded = holder.current
        if loaded is None:
            raise ApiError(404, "no_champion", f"product {product!r} has no champion version any more")
        return loaded

    def _ensure_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_s)
            for product, holder in list(self._holders.items()):
                if holder.evicted:
                    if self._holders.get(product) is holder:
                        del self._holders[product]
                    continue
                try:
                    await self._refresh(holder)
                except Exception:  # noqa: BLE001 - keep serving what is loaded; try again next round
                    log.warning(
                        "champion refresh of %s failed; still serving %s",
                        product,
                        holder.current.version if holder.current else None,
                        exc_info=True,
                    )

    async def _refresh(self, holder: ProductModel) -> None:
        loop = asyncio.get_running_loop()
        try:
            name, version, tags = await loop.run_in_executor(self._io_pool, champion_info, holder.product)
        except ApiError as error:
            if error.status == 404:
                if holder.current is not None:
                    log.warning("%s: %s; no longer served", holder.product, error.message)
                holder.swap(None)
                return
            raise
        current = holder.current
        threshold = threshold_from_tags(tags)
        if current is not None and current.version == version and current.threshold == threshold:
            return
        cached = holder.cache.get(version)
        if cached is not None and threshold is not None:
            loaded = dataclasses.replace(
                cached, threshold=threshold, threshold_method=tags.get("threshold_method"), loaded_at=time.time()
            )
        else:
            loaded = await loop.run_in_executor(
                self._io_pool,
                lambda: load_version(
                    holder.product, name, version, tags, device=self.settings.device, precision=self.settings.precision
                ),
            )
        if holder.evicted:
            return
        holder.swap(loaded)
        self._switches += 1
        log.info("%s: now serving version %s (threshold %.6g)", name, version, loaded.threshold)
