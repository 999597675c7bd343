"""The page as a person uses it, in headless Chromium on the real server (`tests/web/browser.py`): load, change r /
batch / model / GPU, upload a config.json, follow a permalink, a bad input; every number checked against the CLI's
JSON for the same options. Skipped with the reason where Chromium is missing (never in CI)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qsl, urlparse

import pytest

from lora_planner.cli import main

from tests.web.browser import browser_or_skip, chromium, phone, serving, wait_ready

pytest.importorskip("selenium")
pytest.importorskip("uvicorn")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
GIB = 2**30
SWITCHES = ("grad-checkpointing", "liger", "use-dora", "packing", "padding")


@pytest.fixture(scope="module")
def page():
    browser_or_skip()
    with serving() as url, chromium() as driver:
        yield url, driver


def cli_json(capsys, params: dict[str, str], model_path: str | None = None) -> dict:
    argv = [w for k, v in params.items() if k != "theme"
            for w in ((f"--{k}",) if k in SWITCHES else (f"--{k}", v))]
    if model_path:
        argv = ["--model", model_path, *argv]
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def url_params(driver) -> dict[str, str]:
    return dict(parse_qsl(urlparse(driver.current_url).query))


def check_numbers(driver, capsys, model_path: str | None = None) -> dict:
    """The verdicts and the table equal the CLI's JSON for the settings in the URL; returns that JSON."""
    params = url_params(driver)
    params.setdefault("model", "llama-3.1-8b") if model_path is None else None
    doc = cli_json(capsys, params, model_path)
    shown = {el.get_attribute("data-method"): el for el in driver.find_elements(By.CSS_SELECTOR, ".verdict")}
    assert set(shown) == set(doc["methods"])
    for method, m in doc["methods"].items():
        peak = shown[method].find_element(By.CSS_SELECTOR, ".peak")
        assert int(peak.get_attribute("data-bytes")) == m["peak_device_bytes"]
        assert peak.text == f"{m['peak_device_bytes'] / GIB:.2f} GiB"
        fit = shown[method].find_element(By.CSS_SELECTOR, ".fit").text
        assert fit == ("peak on device" if m["fits"] is None else "fits" if m["fits"] else "does not fit")
        cell = driver.find_element(By.CSS_SELECTOR, f'td[data-method="{method}"][data-key="peak allocated"]')
        assert int(cell.get_attribute("data-raw")) == m["peak_allocated_bytes"]
    return doc


def set_value(driver, field: str, value: str) -> None:
    box = driver.find_element(By.ID, field)
    box.clear()
    box.send_keys(value)
    wait_ready(driver)


def test_load_change_and_permalink(page, capsys):
    url, driver = page
    driver.get(url + "/?gpu=rtx-4090")
    wait_ready(driver)
    check_numbers(driver, capsys)
    set_value(driver, "r", "64")
    assert url_params(driver)["r"] == "64"
    check_numbers(driver, capsys)
    set_value(driver, "batch-size", "4")
    driver.find_element(By.ID, "grad-checkpointing").click()
    wait_ready(driver)
    Select(driver.find_element(By.ID, "gpu")).select_by_value("a100-40gb")
    wait_ready(driver)
    set_value(driver, "model", "qwen3-8b")
    params = url_params(driver)
    assert params == {"model": "qwen3-8b", "r": "64", "batch-size": "4", "grad-checkpointing": "1",
                      "gpu": "a100-40gb"}
    doc = check_numbers(driver, capsys)
    # the sweep's point at r = 64 is the plan itself
    dot = driver.find_element(By.CSS_SELECTOR, '#sweep-r circle[data-method="lora"][data-value="64"]')
    assert int(dot.get_attribute("data-bytes")) == doc["methods"]["lora"]["peak_device_bytes"]
    # the copied command gives the same plan, and a permalink restores the page
    driver.find_element(By.ID, "copy-cli").click()
    assert driver.find_element(By.ID, "copy-cli").get_attribute("data-cli") == (
        "lora-plan --model qwen3-8b --r 64 --batch-size 4 --gpu a100-40gb --grad-checkpointing --json")
    # "Download JSON" saves the CLI's document
    assert json.loads(driver.execute_script("return JSON.stringify(window.loraPlanLast.plan)")) == doc
    permalink = driver.current_url
    driver.get(url + "/")
    wait_ready(driver)
    driver.get(permalink)
    wait_ready(driver)
    assert driver.find_element(By.ID, "r").get_attribute("value") == "64"
    assert driver.find_element(By.ID, "grad-checkpointing").is_selected()
    assert check_numbers(driver, capsys) == doc


def test_upload_config(page, capsys):
    url, driver = page
    driver.get(url + "/?gpu=rtx-4090&method=lora")
    wait_ready(driver)
    path = CONFIGS / "qwen3_8b_bnb4bit_config.json"
    driver.find_element(By.ID, "config-file").send_keys(str(path))
    wait_ready(driver)
    assert "using qwen3_8b_bnb4bit_config.json" in driver.find_element(By.ID, "config-name").text
    targets = [c.get_attribute("value") for c in driver.find_elements(By.CSS_SELECTOR, "#targets input")]
    assert "gate_proj" in targets
    check_numbers(driver, capsys, model_path=str(path))
    # pasted text works the same; a pasted non-object is refused at the field
    driver.get(url + "/?gpu=rtx-4090&method=lora")
    wait_ready(driver)
    driver.find_element(By.CSS_SELECTOR, "#paste-box summary").click()
    driver.execute_script("document.getElementById('config-text').value = arguments[0]", "[1, 2]")
    driver.find_element(By.ID, "use-pasted").click()
    assert "not a JSON object" in driver.find_element(By.ID, "err-config").text
    driver.execute_script("document.getElementById('config-text').value = arguments[0]", path.read_text())
    driver.find_element(By.ID, "use-pasted").click()
    wait_ready(driver)
    assert driver.find_element(By.ID, "config-name").text == "using the pasted config"
    check_numbers(driver, capsys, model_path=str(path))


def test_bad_input_shows_at_the_field(page):
    url, driver = page
    driver.get(url + "/")
    wait_ready(driver)
    set_value(driver, "r", "0")
    message = driver.find_element(By.ID, "err-r").text
    assert "must be an integer" in message and driver.find_element(By.ID, "r").get_attribute("aria-invalid") == "true"
    set_value(driver, "gpu-mem", "lots")
    set_value(driver, "r", "8")
    assert driver.find_element(By.ID, "err-gpu-mem").text and not driver.find_element(By.ID, "err-r").text


def test_dark_theme_and_phone_width(page, tmp_path):
    url, driver = page
    driver.get(url + "/?theme=dark&gpu=l4")
    wait_ready(driver)
    assert driver.execute_script("return document.documentElement.dataset.theme") == "dark"
    driver.find_element(By.ID, "theme").click()
    assert driver.execute_script("return document.documentElement.dataset.theme") == "light"
    assert "theme" not in url_params(driver)
    phone(driver)
    driver.get(url + "/?gpu=l4")
    wait_ready(driver)
    assert driver.execute_script("return window.innerWidth") == 390
    width = driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= 390, width  # one column, nothing sideways
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_keyboard_and_labels(page):
    """Every control has a label, and Tab reaches the rank field."""
    url, driver = page
    driver.get(url + "/")
    wait_ready(driver)
    unlabelled = driver.execute_script("""
        return [...document.querySelectorAll('input, select')].filter((c) => !(c.labels && c.labels.length)
          && !c.getAttribute('aria-label') && !c.closest('label')).map((c) => c.id || c.name);""")
    assert unlabelled == []
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    for _ in range(40):
        if driver.switch_to.active_element.get_attribute("id") == "r":
            break
        ActionChains(driver).send_keys(Keys.TAB).perform()
    assert driver.switch_to.active_element.get_attribute("id") == "r"


def test_recommendation_from_the_data(page, capsys):
    """The data's size in the recommendation's card sizes its rank as `recommend --train-tokens` does; a bad size shows
    at its field."""
    url, driver = page
    driver.get(url + "/?gpu=rtx-4090")
    wait_ready(driver)
    set_value(driver, "train-tokens", "1e7")
    assert url_params(driver)["train-tokens"] == "1e7"
    assert main(["recommend", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--train-tokens", "1e7", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    answer = driver.find_element(By.CSS_SELECTOR, "#recommendation .answer")
    assert int(answer.get_attribute("data-bytes")) == doc["predicted_peak_bytes"] and f"r {doc['r']}," in answer.text
    set_value(driver, "capacity-margin", "4")  # twice the margin: a larger rank, as the CLI's
    assert main(["recommend", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--train-tokens", "1e7",
                 "--capacity-margin", "4", "--json"]) == 0
    wider = json.loads(capsys.readouterr().out)
    assert wider["r"] > doc["r"]
    answer = driver.find_element(By.CSS_SELECTOR, "#recommendation .answer")
    assert int(answer.get_attribute("data-bytes")) == wider["predicted_peak_bytes"] and f"r {wider['r']}," in answer.text
    set_value(driver, "capacity-margin", "-1")
    assert "must be in (0, inf]" in driver.find_element(By.ID, "err-capacity-margin").text
    set_value(driver, "capacity-margin", "")
    set_value(driver, "train-tokens", "lots")
    assert driver.find_element(By.ID, "err-train-tokens").text


def test_trainer_objective(page, capsys):
    """The objective select plans TRL's trainer as `lora-plan --objective` does (ORPO's pairs, GRPO's round), sends
    recommend-only names to the recommendation and their step to the plan, and a refusal shows at its field."""
    url, driver = page
    driver.get(url + "/?gpu=a100-80gb&batch-size=8&grad-checkpointing=1")
    wait_ready(driver)
    for value in ("orpo", "grpo"):
        Select(driver.find_element(By.ID, "objective")).select_by_value(value)
        wait_ready(driver)
        assert url_params(driver)["objective"] == value
        doc = check_numbers(driver, capsys)
        assert doc["inputs"]["objective"] == value
    # "rl" is recommend's name: the plan runs GRPO's step, the recommendation searches it
    Select(driver.find_element(By.ID, "objective")).select_by_value("rl")
    wait_ready(driver)
    params = url_params(driver)
    assert params["objective"] == "rl"
    doc = cli_json(capsys, {**params, "objective": "grpo"} | {"model": "llama-3.1-8b"})
    shown = driver.find_element(By.CSS_SELECTOR, '.verdict[data-method="lora"] .peak')
    assert int(shown.get_attribute("data-bytes")) == doc["methods"]["lora"]["peak_device_bytes"]
    assert "GRPO" in driver.find_element(By.ID, "recommendation").text
    # KTO needs two examples a micro-batch: the message shows at the batch's field
    Select(driver.find_element(By.ID, "objective")).select_by_value("kto")
    set_value(driver, "batch-size", "1")
    assert "at least 2 examples" in driver.find_element(By.ID, "err-batch-size").text
