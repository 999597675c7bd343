"""`lora-plan serve`: the planner as a local web page, on Starlette (the ASGI toolkit FastAPI is built on: routing,
requests, responses and a test client in one small, well-kept package with two dependencies) served by uvicorn.
Both live in the optional `web` extra; the bare planner never imports them.

Routes: `/` the page (`static/index.html`, plain HTML / CSS / JavaScript, no build step, no CDN: it works offline);
`/static/*`; the JSON API of `lora_planner.web.api`:

| route | answers |
|---|---|
| `GET /api/plan?<options>`, `POST {"params": {...}, "config": {...}}` | `{"plan": <--json>, "cli", "server_ms", ...}` |
| `GET /api/recommend?<options>`, `POST` likewise | `{"recommendation": <recommend --json>, "cli", "server_ms", ...}` |
| `GET /api/sweep?axis=r&values=1,2,4&<options>`, `POST` | every method's device peak per value, the usable memory |
| `GET /api/models?q=llama` | catalog models matching `q` |
| `GET /api/modules?model=qwen3-8b`, `POST {"config": ...}` | the model's linear module names, PEFT's default targets |
| `GET /api/gpus` | the GPU catalog |

Bad input answers 400 with `{"error": {"field", "message", "fix"}}`; the options are the CLI's flags without dashes.
Every JSON object answered also carries `server_ms` (the request's time in the server) and `server_cpu_ms` (the CPU
time of the thread that answered it: less than `server_ms` when other processes had the CPU).
Latency: every change of the page asks the plan, up to three sweeps and a recommendation (~50-150 planner calls when
the model, the GPU or the sequence length changed, ~0.3 ms each). The planner allocates many small objects and keeps a
few hundred thousand in its caches, so CPython's default collector thresholds (700, 10, 10) run full collections of
them often enough to double the slowest changes' time: `prepare_process` (which `serve` calls) imports the planner,
freezes what start-up allocated (`gc.freeze`) and raises the thresholds (`GC_THRESHOLDS`); `experiments/web/
latency.py` measures the page under the same settings.

Known limitations: one process, no authentication (it binds 127.0.0.1 by default: a local tool).
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lora_planner.web import api

STATIC = Path(__file__).resolve().parent / "static"
# (young objects between collections, young collections per middle one, middle ones per full one): the planner's
# garbage is acyclic (reference counting frees it), so collections rarely find anything; these keep them rare
GC_THRESHOLDS = (100_000, 50, 1_000)
MAX_BODY_BYTES = 2 * 2**20  # a config.json is a few KB


async def _inputs(request: Request) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(options, uploaded config) from the query string or a JSON body."""
    if request.method == "GET":
        return dict(request.query_params), None
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise api.WebInputError("config", "larger than 2 MiB", "upload a model's config.json")
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise api.WebInputError("body", "not JSON", 'send {"params": {...}, "config": {...}}') from None
    if not isinstance(data, dict) or not isinstance(data.get("params", {}), dict):
        raise api.WebInputError("body", "not a JSON object with params", 'send {"params": {...}, "config": {...}}')
    config = data.get("config")
    return {**dict(request.query_params), **data.get("params", {})}, config


def _answer(compute) -> Any:
    async def endpoint(request: Request) -> Response:
        start, start_cpu = time.perf_counter(), time.thread_time()
        try:
            params, config = await _inputs(request)
            result = compute(params, config)
        except api.WebInputError as err:
            return JSONResponse({"error": err.as_dict()}, status_code=400)
        if isinstance(result, dict):
            result["server_ms"] = round((time.perf_counter() - start) * 1000, 2)
            result["server_cpu_ms"] = round((time.thread_time() - start_cpu) * 1000, 2)  # (less: time descheduled)
        return JSONResponse(result)

    return endpoint


def _sweep(params: dict[str, Any], config: dict[str, Any] | None) -> dict[str, Any]:
    axis = str(params.pop("axis", ""))
    text = str(params.pop("values", ""))
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise api.WebInputError("values", f"{text!r} is not a comma list of integers", "e.g. values=1,2,4,8") from None
    return api.sweep(params, axis, values, config)


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


def create_app() -> Starlette:
    return Starlette(routes=[
        Route("/", index),
        Route("/api/plan", _answer(api.plan), methods=["GET", "POST"]),
        Route("/api/recommend", _answer(api.recommend), methods=["GET", "POST"]),
        Route("/api/sweep", _answer(_sweep), methods=["GET", "POST"]),
        Route("/api/models", _answer(lambda p, c: {"models": api.models(str(p.get("q", "")))})),
        Route("/api/modules", _answer(api.model_modules), methods=["GET", "POST"]),
        Route("/api/gpus", _answer(lambda p, c: {"gpus": api.gpus()})),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])


def prepare_process() -> None:
    """A serving process's set-up (see the module docstring): the planner imported, start-up's objects frozen, the
    collector's thresholds raised."""
    import importlib

    for module in ("lora_planner.cli", "lora_planner.recommend_cli"):  # the planner, before the first request
        importlib.import_module(module)

    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def serve(host: str = "127.0.0.1", port: int = 8000, open_browser: bool = False) -> None:
    import uvicorn

    prepare_process()
    if open_browser:
        import threading
        import webbrowser

        threading.Timer(1.0, webbrowser.open, (f"http://{host}:{port}/",)).start()
    uvicorn.run(create_app(), host=host, port=port, log_level="warning")
