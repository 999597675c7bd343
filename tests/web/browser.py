"""A real browser on the real server, for the page's tests and experiments: uvicorn on a free port in a thread, Debian's
headless Chromium driven by Selenium through chromium-driver (no browser download). `browser_or_skip` skips with the
reason where Chromium is missing, unless LORA_PLAN_REQUIRE_BROWSER=1 (CI sets it: there a missing browser fails)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def browser_or_skip() -> None:
    if CHROMIUM and DRIVER:
        return
    reason = "the web tests need Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
    if os.environ.get("LORA_PLAN_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@contextlib.contextmanager
def serving() -> Iterator[str]:
    import uvicorn

    from lora_planner.web.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 1600) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def phone(driver, width: int = 390, height: int = 844) -> None:
    """Emulate a phone's viewport (a desktop window cannot be narrower than ~500 px)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": True})


def wait_ready(driver, timeout: float = 30) -> None:
    """Until the page has drawn the answer to its latest settings (the body's data-state) and its sweeps."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                         in ("ready", "error"))
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return window.loraPlanIdle === true"))
