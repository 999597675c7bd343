"""Measurement side of the planner: the only package area that imports torch.

`lora_planner.profiler.tracker` holds the exact live-tensor memory tracker; import it explicitly
(this package does not import torch on its own).
"""
