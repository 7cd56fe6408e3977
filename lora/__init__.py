"""lora: LoRA for any nn.Module, small enough to read in one sitting.

    report = lora.inject(model, ["to_q", "to_k", "to_v", "to_out.0"], rank=16, alpha=32)
    ... train: only adapter parameters require grad (lora.trainable_parameters(model)) ...
    lora.save_file(model, "my_lora.safetensors", format="kohya")

    lora.load_file(other_model, "my_lora.safetensors", name="style")  # several adapters, each by name
    lora.set_scale(other_model, 0.7, name="style")
    with lora.disabled(other_model): ...                               # the base model's output
    lora.merge(other_model); lora.remove(other_model)                  # exact weights back

Nothing here knows about SDXL; minsdxl.lora_files passes the SDXL names in. docs/lora.md has the
rules (matching, supported layers, merge/scale semantics, files) and the same tasks in peft.
"""

from .errors import LoRAError
from .files import load_file, read_file, save_file
from .inject import (InjectionReport, adapted_paths, bake, disabled, init_adapters, inject, lora_layers, merge, remove,
                     set_scale, state_dict, summary, trainable_parameters, unmerge)
from .layer import LoRALayer, supported
from .matching import compile_pattern, matches

__all__ = ["inject", "bake", "InjectionReport", "LoRAError", "LoRALayer", "lora_layers", "adapted_paths", "merge",
           "unmerge", "remove", "set_scale", "disabled", "init_adapters", "trainable_parameters", "summary",
           "state_dict", "save_file", "load_file", "read_file", "matches", "compile_pattern", "supported"]
