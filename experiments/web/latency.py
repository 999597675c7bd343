"""The page's latency over a scripted session (issue 15): 60 changes a person makes (rank, micro-batch, sequence
length, GPU, model, methods, checkpointing), each waited for until every view has redrawn. Recorded per change: the
server's own time for each request the change makes (`server_ms` in the answers: the plan, three sweeps, the
recommendation; `server_cpu_ms`, the CPU time of the thread that answered), their sums, and the time in the page from
the last input event of the change to the last redraw (`loraPlanChangedAt` -> `loraPlanIdleAt`, including the page's
60 ms debounce of keystrokes).

The server runs as `lora-plan serve` does, in a process of its own (`--in-process`: in a thread of this one, beside the
browser's driver, as the browser tests run it). On a small machine the browser's own work (layout, software
rasterisation of the charts) shares the cores with the server while it answers, so the session is then replayed: the
same requests, in the same order and grouping, sent to a fresh `lora-plan serve` with no browser running (`replay` in
the JSON): the server's time alone.

    python experiments/web/latency.py    # writes experiments/web/latency.json and prints p50 / p95
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.web.browser import chromium, serving, wait_ready  # noqa: E402

# installed before the page's own script (every request it makes, the first load's too, with its answer's times)
RECORD = """window.__times = []; const f = window.fetch;
window.fetch = async (...a) => { const r = await f(...a); r.clone().json().then((d) => {
  if (d.server_ms !== undefined)
    window.__times.push([String(a[0]), d.server_ms, d.server_cpu_ms, (a[1] && a[1].body) || null]); });
  return r; };"""


def changes():
    from selenium.webdriver.support.ui import Select

    def typed(field, value):
        def act(driver):
            from selenium.webdriver.common.by import By
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        return act

    def picked(field, value):
        def act(driver):
            from selenium.webdriver.common.by import By
            Select(driver.find_element(By.ID, field)).select_by_value(value)
        return act

    def clicked(field):
        def act(driver):
            from selenium.webdriver.common.by import By
            driver.find_element(By.ID, field).click()
        return act

    script = []
    for r in ("4", "16", "32", "64", "128", "8"):
        script.append(typed("r", r))
    for b in ("2", "4", "8", "1"):
        script.append(typed("batch-size", b))
    for s in ("2048", "4096", "8192", "1024"):
        script.append(typed("seq-len", s))
    for g in ("rtx-4090", "a100-80gb", "l4", "h100-80gb"):
        script.append(picked("gpu", g))
    for m in ("qwen3-8b", "mistral-7b", "llama-3.2-1b", "llama-3.1-8b"):
        script.append(typed("model", m))
    script += [clicked("grad-checkpointing"), clicked("m-full"), clicked("m-full"), clicked("grad-checkpointing")]
    return (script * 3)[:60]


@contextlib.contextmanager
def serve_process() -> Iterator[str]:
    """`lora-plan serve` on a free port, in its own process, until the block ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", "import sys; from lora_planner.cli import main; "
                               f"sys.exit(main(['serve', '--port', '{port}']))"], cwd=ROOT,
                              stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/api/gpus", timeout=1).read()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("lora-plan serve did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(10)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def replay(url: str, recorded: list[list]) -> list[dict]:
    """Each change's requests sent again, one after the other, to the server at `url`: (server_ms, server_cpu_ms) of
    each and their sums."""
    rows = []
    for requests in recorded:
        times = []
        for path, _, _, body in requests:
            request = urllib.request.Request(url + path, data=body.encode() if body else None,
                                             headers={"Content-Type": "application/json"})
            answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
            times.append([path, answer["server_ms"], answer["server_cpu_ms"]])
        rows.append({"requests": times, "server_ms": sum(t[1] for t in times),
                     "server_cpu_ms": sum(t[2] for t in times)})
    return rows


def summary_of(rows: list[dict]) -> dict:
    per_kind = {}
    for row in rows:
        for path, ms, *_ in row["requests"]:
            per_kind.setdefault(path.rsplit("/", 1)[-1], []).append(ms)
    out = {"server_ms_per_change": {"p50": pct([r["server_ms"] for r in rows], 0.5),
                                    "p95": pct([r["server_ms"] for r in rows], 0.95)},
           "server_cpu_ms_per_change": {"p50": pct([r["server_cpu_ms"] for r in rows], 0.5),
                                        "p95": pct([r["server_cpu_ms"] for r in rows], 0.95)}}
    if "page_ms" in rows[0]:
        out["page_ms_per_change"] = {"p50": pct([r["page_ms"] for r in rows], 0.5),
                                     "p95": pct([r["page_ms"] for r in rows], 0.95)}
    out["server_ms_per_request"] = {k: {"n": len(v), "p50": pct(v, 0.5), "p95": pct(v, 0.95),
                                        "mean": round(statistics.mean(v), 2)} for k, v in sorted(per_kind.items())}
    return out


def main() -> None:
    in_process = "--in-process" in sys.argv[1:]
    if in_process:
        from lora_planner.web.app import prepare_process

        prepare_process()  # as `lora-plan serve` does
    rows = []
    with (serving() if in_process else serve_process()) as url, chromium() as driver:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD})
        driver.get(url + "/?gpu=rtx-4090")
        wait_ready(driver)
        time.sleep(0.05)
        first_load = driver.execute_script("const t = window.__times; window.__times = []; return t")
        for act in changes():
            start = time.perf_counter()
            act(driver)
            wait_ready(driver)
            wall_ms = (time.perf_counter() - start) * 1000
            time.sleep(0.05)  # the last answer's JSON is read asynchronously
            times = driver.execute_script("const t = window.__times; window.__times = []; return t")
            page_ms = driver.execute_script("return window.loraPlanIdleAt - window.loraPlanChangedAt")
            rows.append({"requests": [t[:3] for t in times], "bodies": [t[3] for t in times],
                         "server_ms": sum(t[1] for t in times), "server_cpu_ms": sum(t[2] for t in times),
                         "page_ms": page_ms, "selenium_ms": wall_ms})
    with serve_process() as url:  # the first load's requests, then the session's: the state the browser's server had
        replay(url, [first_load])
        replayed = replay(url, [[[*t, b] for t, b in zip(r["requests"], r["bodies"])] for r in rows])
    summary = {"changes": len(rows),
               "browser_session": {"server": "in this process" if in_process else "lora-plan serve (own process)",
                                   **summary_of(rows)},
               "replay": {"server": "lora-plan serve (own process), no browser", **summary_of(replayed)}}
    out = Path(__file__).with_name("latency.json")
    out.write_text(json.dumps({"summary": summary, "changes": rows, "replay": replayed}, indent=1) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
