"""lora_planner: will a LoRA / full fine-tune fit, how fast will it run, and what should I use?

The analytic planner (`specs`, `catalog`, `params`, `memory`) is pure Python and never imports torch;
only `lora_planner.profiler` does, lazily.
"""

__version__ = "0.1.0"
