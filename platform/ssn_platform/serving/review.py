"""The review page and its routes, served by the inspection app itself (`ReviewRoutes`, mixed into the replica).

* Keeping: with ``review_bucket`` set, an inspected image whose score lies within ``review_band`` of the threshold
  is kept with probability ``review_sample``, and every flagged one when ``review_flagged`` (`ssn_platform.review`:
  ``s3://<review_bucket>/review/<product>/``). The write happens in the replica's I/O pool after the answer is
  computed; a failed write is logged and never fails the inspection.
* ``GET /review/{product}``: one server-rendered HTML page (no build step; a little JavaScript) listing the kept
  images with their maps, scores and labels. An operator marks each ``normal`` or ``defective``, may paint the
  defect on the image (the mask is sent as a PNG at the image's size), and publishes the labels as a new dataset
  version; the page then shows what the version added. The page's calls: ``POST /review/{product}/items/{id}/label``
  (JSON ``{"label": ..., "mask_png": <base64 or null>}``), ``POST /review/{product}/publish``, and the images at
  ``GET /review/{product}/items/{id}/{image|map}``.
* Access: the API key of the product, as for inspections: ``Authorization: Bearer <key>``, or for a browser the key
  entered once in the page's form (``POST /review/{product}/login``), kept in an HttpOnly, SameSite=Strict cookie
  scoped to ``/review`` (Secure behind https). SameSite=Strict keeps other sites from posting labels with it.
"""

import asyncio
import base64
import html
import io
import json
import logging
import random
import urllib.parse
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from PIL import Image

from supersimplenet.visualize import colorize
from ssn_platform.review import ReviewError, ReviewStore
from ssn_platform.serving.requests import ApiError, error_response, png_base64

log = logging.getLogger("ray.serve")
COOKIE = "ssn_review_key"
PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Review {product}</title><style>
body{{font-family:sans-serif;margin:1em}} .item{{display:inline-block;border:1px solid #ccc;margin:.4em;padding:.4em;
vertical-align:top}} .pair{{position:relative;display:inline-block}} canvas{{position:absolute;left:0;top:0;
cursor:crosshair;opacity:.5}} img{{height:200px}} .labelled{{background:#eef}}</style></head><body>
<h1>Review: {product}</h1><p>{count} kept images; {waiting} labelled and not published yet.
<button id="publish">Publish labels as a new dataset version</button></p><p id="result">{published}</p>
{items}
<script>
const product = {product_json};
function post(url, body) {{
  return fetch(url, {{method: "POST", headers: {{"Content-Type": "application/json"}}, body: JSON.stringify(body),
                      credentials: "same-origin"}}).then(r => r.json().then(j => ({{ok: r.ok, body: j}})));
}}
document.querySelectorAll(".item").forEach(item => {{
  const canvas = item.querySelector("canvas"), image = item.querySelector("img.image");
  let painted = false, down = false;
  image.addEventListener("load", () => {{ canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
    canvas.style.width = image.width + "px"; canvas.style.height = image.height + "px"; }});
  if (image.complete) image.dispatchEvent(new Event("load"));
  const paint = e => {{ if (!down) return; const r = canvas.getBoundingClientRect(), ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff"; const s = canvas.width / r.width; ctx.beginPath();
    ctx.arc((e.clientX - r.left) * s, (e.clientY - r.top) * s, 6 * s, 0, 7); ctx.fill(); painted = true; }};
  canvas.addEventListener("mousedown", e => {{ down = true; paint(e); }});
  canvas.addEventListener("mousemove", paint);
  window.addEventListener("mouseup", () => {{ down = false; }});
  item.querySelectorAll("button[data-label]").forEach(button => button.addEventListener("click", () => {{
    const label = button.dataset.label;
    const mask = (label === "defective" && painted) ? canvas.toDataURL("image/png").split(",")[1] : null;
    post(`/review/${{product}}/items/${{item.dataset.id}}/label`, {{label: label, mask_png: mask}}).then(r => {{
      item.querySelector(".label").textContent = r.ok ? r.body.label + (r.body.mask ? " (painted)" : "")
                                                        : "error: " + r.body.error.message;
      if (r.ok) item.classList.add("labelled");
    }});
  }}));
}});
document.getElementById("publish").addEventListener("click", () => {{
  document.getElementById("result").textContent = "publishing...";
  post(`/review/${{product}}/publish`, {{}}).then(r => {{
    document.getElementById("result").textContent = r.ok ?
      `Published dataset version ${{r.body.version}} (from ${{r.body.base_version}}): +${{r.body.added.normal}} normal,
       +${{r.body.added.defective}} defective in split ${{r.body.split}}` : "error: " + r.body.error.message;
  }});
}});
</script></body></html>"""
ITEM = """<div class="item{cls}" data-id="{id}"><div class="pair"><img class="image" src="{base}/image" alt="image">
<canvas></canvas></div> <img src="{base}/map" alt="anomaly map"><br>score {score:.4f} (threshold {threshold:.4f},
{decision}; kept: {why}; version {version})<br>label: <b class="label">{label}</b>
<button data-label="normal">normal</button> <button data-label="defective">defective</button></div>"""
LOGIN = """<!doctype html><html><head><meta charset="utf-8"><title>Review {product}: sign in</title></head><body>
<h1>Review: {product}</h1><form method="post" action="/review/{product}/login"><label>API key
<input type="password" name="key" autocomplete="off"></label> <button type="submit">Sign in</button></form>
<p>{message}</p></body></html>"""


class ReviewRoutes:
    """What the review routes do; the replica (`ssn_platform.serving.app.InspectorReplica`) inherits it."""

    def _review_store(self, product: str) -> ReviewStore:
        if not self.settings.review_bucket:
            raise ApiError(404, "review_disabled", "this endpoint keeps no images for review (review_bucket unset)")
        return ReviewStore(self.settings.review_bucket, product)

    def _review_key(self, request: Request, product: str) -> str:
        """The product's API key as the request presents it (header or cookie); ApiError 401/403 otherwise."""
        headers = dict(request.headers)
        if "authorization" not in headers and request.cookies.get(COOKIE):
            headers["authorization"] = f"Bearer {request.cookies[COOKIE]}"
        return self.api_keys.check(headers, product).name

    def _maybe_keep(self, loaded: Any, data: bytes, result: dict[str, Any], anomaly_map: Any) -> None:
        """Schedules the write of a kept image (module docstring); returns at once."""
        settings = self.settings
        if not settings.review_bucket:
            return
        near = abs(result["score"] - result["threshold"]) <= settings.review_band
        flagged = settings.review_flagged and result["is_anomalous"]
        if not (flagged or (near and random.random() < settings.review_sample)):
            return

        def write() -> None:
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image_format = image.format or "PNG"
                record = {
                    k: result[k]
                    for k in (
                        "score",
                        "threshold",
                        "is_anomalous",
                        "model_version",
                        "registered_model",
                        "image_width",
                        "image_height",
                    )
                }
                record["why"] = "flagged" if flagged else f"within {settings.review_band:g} of the threshold"
                ReviewStore(settings.review_bucket, loaded.product).keep(
                    data, image_format, base64.b64decode(png_base64(colorize(anomaly_map))), record
                )
            except Exception:  # noqa: BLE001 - the inspection was answered; the review copy is best effort
                log.warning("keeping an image of %s for review failed", loaded.product, exc_info=True)

        self._io_pool.submit(write)

    async def _review_call(self, request: Request, product: str, work, *, html_page: bool = False) -> Any:
        """Authenticates, runs `work(store, key name)` in the I/O pool and answers its result or the error."""
        try:
            store = self._review_store(product)
            try:
                who = self._review_key(request, product)
            except ApiError as error:
                if html_page and error.status == 401:
                    return HTMLResponse(LOGIN.format(product=html.escape(product), message=""), status_code=401)
                raise
            return await asyncio.get_running_loop().run_in_executor(self._io_pool, lambda: work(store, who))
        except ApiError as error:
            return error.response()
        except ReviewError as error:
            return error_response(error.status, "review_error", str(error))

    async def _review_page(self, product: str, request: Request) -> Any:
        def render(store: ReviewStore, _: str) -> HTMLResponse:
            items = store.items()
            published = store.published_items()
            waiting = sum(1 for i in items if i["label"] and i["id"] not in published)
            cards = [
                ITEM.format(
                    cls=" labelled" if item["label"] else "",
                    id=html.escape(item["id"]),
                    base=f"/review/{html.escape(product)}/items/{html.escape(item['id'])}",
                    score=item["score"],
                    threshold=item["threshold"],
                    decision="anomalous" if item["is_anomalous"] else "normal",
                    why=html.escape(str(item.get("why"))),
                    version=html.escape(str(item.get("model_version"))),
                    label=html.escape(item["label"]["label"] if item["label"] else "not labelled"),
                )
                for item in items
            ]
            return HTMLResponse(
                PAGE.format(
                    product=html.escape(product),
                    product_json=json.dumps(product),
                    count=len(items),
                    waiting=waiting,
                    items="\n".join(cards),
                    published=f"{len(published)} items published so far.",
                )
            )

        return await self._review_call(request, product, render, html_page=True)

    async def _review_login(self, product: str, request: Request) -> Any:
        form = urllib.parse.parse_qs((await request.body())[:4096].decode("utf-8", "replace"))
        key = (form.get("key") or [""])[0].strip()
        try:
            self._review_store(product)
            self.api_keys.check({"authorization": f"Bearer {key}"}, product)
        except ApiError as error:
            message = "That key may not review this product." if error.status in (401, 403) else error.message
            return HTMLResponse(
                LOGIN.format(product=html.escape(product), message=html.escape(message)), status_code=error.status
            )
        response = RedirectResponse(f"/review/{urllib.parse.quote(product)}", status_code=303)
        response.set_cookie(
            COOKIE,
            key,
            httponly=True,
            samesite="strict",
            path="/review",
            secure=request.url.scheme == "https",
            max_age=8 * 3600,
        )
        return response

    async def _review_file(self, product: str, item_id: str, name: str, request: Request) -> Any:
        def read(store: ReviewStore, _: str) -> Response:
            if name not in ("image", "map"):
                raise ApiError(404, "not_found", f"no file {name!r}; image or map")
            data, media = store.file(item_id, name)
            return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})

        return await self._review_call(request, product, read)

    async def _review_label(self, product: str, item_id: str, request: Request) -> Any:
        try:
            body = json.loads((await request.body())[: 32 * 1024 * 1024] or b"{}")
            mask = base64.b64decode(body["mask_png"], validate=True) if body.get("mask_png") else None
            label = body.get("label")
        except (ValueError, TypeError, AttributeError):
            return error_response(400, "review_error", "the body must be JSON {label, mask_png (base64 PNG) or null}")
        return await self._review_call(
            request, product, lambda store, who: JSONResponse(store.label(item_id, label, by=who, mask_png=mask))
        )

    async def _review_publish(self, product: str, request: Request) -> Any:
        def publish(store: ReviewStore, _: str) -> JSONResponse:
            result = store.publish(split=self.settings.review_split)
            return JSONResponse(
                {
                    "dataset": result.dataset_uri,
                    "version": result.version,
                    "base_version": result.base_version,
                    "added": result.added,
                    "items": list(result.items),
                    "split": result.split,
                }
            )

        return await self._review_call(request, product, publish)


__all__ = ["ReviewRoutes"]
