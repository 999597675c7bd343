"""Screenshots of the page's main views for the README (`reports/web/`): light at 1280 px, dark at 1280 px, and a
phone (390 px), on Llama-3.1-8B with an RTX 4090, checkpointing, r 16 on every linear.

    python experiments/web/screenshots.py        # needs the web extra and Debian's chromium + chromium-driver
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.web.browser import chromium, phone, serving, wait_ready  # noqa: E402

OUT = ROOT / "reports" / "web"
VIEW = "/?gpu=rtx-4090&grad-checkpointing=1&r=16&target=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with serving() as url:
        for name, width, height, extra in (("light", 1280, 2300, ""), ("dark", 1280, 2300, "&theme=dark"),
                                           ("phone", 390, 3600, "")):
            with chromium(width, height) as driver:
                if name == "phone":
                    phone(driver, width, height)
                driver.get(url + VIEW + extra)
                wait_ready(driver)
                driver.save_screenshot(str(OUT / f"{name}.png"))
                print(f"wrote {OUT / f'{name}.png'}")


if __name__ == "__main__":
    main()
