"""A throw-away folder per generated case, holding the files an argument vector names.

Strategies never see a real path (hypothesis must be able to print and replay a case): they name files
with `Ref("config")`, `Ref("fifo")`, ...; `Workspace.resolve` turns a `Ref` into the path of that file
inside the case's folder (relative: the command runs with the folder as its working directory, so a
default such as `profile --out runs.jsonl` lands there too). `Workspace.write` puts generated content
(a mutated config, grid, record file, calibration) under a name before the run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

TINY_LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256}


@dataclass(frozen=True)
class Ref:
    """A file of the case's workspace, by name (see `Workspace.resolve`)."""

    name: str

    def __repr__(self) -> str:
        return f"Ref({self.name!r})"


# Special names: what they resolve to. Every other name is a file of that name in the workspace (written by
# the strategies, e.g. "config.json", "runs.jsonl", "grid.toml", "calib.json").
SPECIAL = {
    "dir": "a_folder",                      # a folder
    "fifo": "a_fifo",                       # a named pipe with no writer / reader: opening it blocks
    "devzero": "/dev/zero",                 # an endless character device
    "under_file": "plain.txt/below.json",   # a path under a regular file
    "missing": "no/such/file.json",         # nonexistent
    "long_name": "n" * 300 + ".json",       # one component over NAME_MAX
    "long_path": "/".join(["p" * 200] * 30),  # over PATH_MAX
    "unicode": "ünïcødé-漢字.json",           # a non-ASCII name (a copy of config.json)
    "dotted": "./config.json",              # config.json spelled another way
    "out_new": "out/new/runs.jsonl",        # a new file in new folders
    "report_dir": "report_out",             # a new folder
    "calib_out": "out/calib.json",          # a new file in a new folder
}


class Workspace:
    """The folder of one case (a context manager: created on enter, removed on exit)."""

    def __init__(self) -> None:
        self.root: Path | None = None

    def __enter__(self) -> "Workspace":
        self.root = Path(tempfile.mkdtemp(prefix="lora-fuzz-"))
        (self.root / SPECIAL["dir"]).mkdir()
        os.mkfifo(self.root / SPECIAL["fifo"])
        (self.root / "plain.txt").write_text("not a folder\n")
        from json import dumps

        (self.root / "config.json").write_text(dumps(TINY_LLAMA))
        (self.root / SPECIAL["unicode"]).write_text(dumps(TINY_LLAMA))
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.root is not None
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def resolve(self, token: str | Ref) -> str:
        if not isinstance(token, Ref):
            return token
        return SPECIAL.get(token.name, token.name)

    def path(self, token: str | Ref) -> Path:
        """The absolute path of a workspace file."""
        assert self.root is not None
        return self.root / self.resolve(token)

    def write(self, name: str, content: str | bytes) -> Ref:
        path = self.path(Ref(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode("utf-8", errors="surrogatepass")
        path.write_bytes(content)
        return Ref(name)

    def snapshot(self, token: str | Ref) -> bytes | None:
        """The bytes of a regular file (None when there is none)."""
        path = self.path(token)
        try:
            return path.read_bytes() if path.is_file() else None
        except OSError:
            return None
