"""`lora-plan serve`: the planner as a local web page (issue 15). `api` holds the JSON API as plain functions over
the CLI's own parsing and documents; `app` routes to them with Starlette and serves `static/` (the page); `serve` is
the subcommand. Starlette and uvicorn come with the `web` extra: `pip install -e ".[web]"`."""
