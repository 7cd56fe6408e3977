"""lora: LoRA for any nn.Module, small enough to read in one sitting.

    report = lora.inject(model, ["to_q", "to_k", "to_v", "to_out.0"], rank=16, alpha=32)
    ... train: only adapter parameters require grad ...
    lora.save_file(model, "my_lora.safetensors", format="kohya")

Nothing here knows about SDXL; minsdxl.lora_files passes the SDXL names in.
"""

from .files import load_file, read_file, save_file
from .inject import InjectionReport, LoRAError, bake, inject, lora_layers, merge, remove, set_scale, state_dict, unmerge
from .layer import LoRALayer
from .matching import compile_pattern, matches

__all__ = ["inject", "bake", "InjectionReport", "LoRAError", "LoRALayer", "lora_layers", "merge", "unmerge", "remove",
           "set_scale", "state_dict", "save_file", "load_file", "read_file", "matches", "compile_pattern"]
