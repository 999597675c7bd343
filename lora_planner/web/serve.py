"""`lora-plan serve`'s entry point: one line, exit 2, when the web extra is missing."""

from __future__ import annotations

import argparse

from lora_planner.errors import PlannerInputError


def run_serve_command(args: argparse.Namespace) -> int:
    try:
        from lora_planner.web.app import serve
    except ImportError as err:
        raise PlannerInputError("serve", f"the web page needs {err.name}", 'pip install -e ".[web]"') from None
    print(f"lora-plan: serving on http://{args.host}:{args.port}/ (Ctrl-C stops)")
    serve(args.host, args.port, args.open_browser)
    return 0
