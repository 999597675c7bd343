"""A launcher's config, which names the GPU the run gets: the verdict and the smallest edit to fit are for it.

- SkyPilot task YAML (`sky launch task.yaml`; SkyPilot's `resources.accelerators`: "A100-80GB:8", {"H100": 8}, or
  a list of choices: the first is planned) and `num_nodes`;
- axolotl's cloud config (`axolotl train config.yaml --cloud cloud.yaml`; axolotl 067b021 `examples/cloud/modal.yaml`,
  `baseten.yaml`: `gpu`, `gpu_count`, `node_count`).

The GPU's name is resolved as `--gpu` resolves it (`lora_planner.gpus`: "A100-80GB" -> a100-80gb, "H100" ->
h100-80gb); the count per node times the nodes is `--gpus` (data parallel unless another file names a strategy)."""

from __future__ import annotations

from typing import Any

from lora_planner.from_files.fields import Collected, bad, positive

CLOUD_KEYS = frozenset({"provider", "gpu_count", "node_count", "dockerfile_commands", "memory_preprocess"})


def detect(data: dict[str, Any]) -> bool:
    resources = data.get("resources")
    skypilot = isinstance(resources, dict) and "accelerators" in resources
    return skypilot or ("gpu" in data and bool(set(data) & CLOUD_KEYS))


def read(path: str, data: dict[str, Any]) -> Collected:
    out = Collected(path)
    if isinstance(data.get("resources"), dict):
        name, count = _accelerators(path, data["resources"]["accelerators"])
        nodes = positive(path, "num_nodes", data.get("num_nodes", 1))
        key = "resources.accelerators"
    else:
        name = data["gpu"]
        if not isinstance(name, str) or not name.strip():
            raise bad(path, "gpu", "a GPU name such as h100", name)
        count = positive(path, "gpu_count", data.get("gpu_count", 1))
        nodes = positive(path, "node_count", data.get("node_count", 1))
        key = "gpu"
    out.set("gpu", key, name.strip())
    out.set("gpus", key, count * nodes)
    if nodes > 1:
        out.set("gpus_per_node", key, count)
    return out


def _accelerators(path: str, value: Any) -> tuple[str, int]:
    """SkyPilot's spellings: "A100:8", "A100" (one), {"A100": 8}, or a list / set of them (the first)."""
    if isinstance(value, list) and value:
        value = value[0]
    if isinstance(value, dict) and len(value) >= 1:
        name, count = next(iter(value.items()))
        return str(name), positive(path, "resources.accelerators", count if count is not None else 1)
    if isinstance(value, str) and value.strip():
        name, _, count = value.partition(":")
        if count and not count.strip().isdigit():
            raise bad(path, "resources.accelerators", 'a GPU and a count such as "A100-80GB:8"', value)
        return name.strip(), int(count) if count else 1
    raise bad(path, "resources.accelerators", 'a GPU and a count such as "A100-80GB:8"', value)
