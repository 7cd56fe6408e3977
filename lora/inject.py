"""Put LoRA layers into any nn.Module: one recursive walk that knows each module's full path.

The order of the steps makes three classic bugs impossible:
  1. everything is frozen *before* any adapter exists, so only adapter parameters can train;
  2. each adapter is created on its base layer's device (and in `dtype` or the base dtype), so it
     is never left on the CPU while the model is on the GPU;
  3. a target list that matches nothing is an error listing the patterns, never a silent no-op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .layer import LoRALayer
from .matching import matches


class LoRAError(ValueError):
    """Bad LoRA targets, files or options; the message says what and how to fix it."""


@dataclass
class InjectionReport:
    """What `inject` did."""

    wrapped: int  # number of layers that got an adapter
    trainable_params: int
    total_params: int
    paths: list[str] = field(default_factory=list)  # module paths of the wrapped layers
    unmatched_patterns: list[str] = field(default_factory=list)  # targets that matched no layer
    skipped_convs: list[str] = field(default_factory=list)  # matched kxk convs, adapted only with conv_rank

    def __str__(self) -> str:
        s = (f"{self.wrapped} layers adapted, {self.trainable_params:,} trainable of {self.total_params:,} parameters "
             f"({100 * self.trainable_params / max(1, self.total_params):.3f}%)")
        if self.unmatched_patterns:
            s += f"; patterns that matched nothing: {self.unmatched_patterns}"
        if self.skipped_convs:
            s += f"; {len(self.skipped_convs)} matched kxk convs skipped (pass conv_rank to adapt them)"
        return s


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """{module path: LoRALayer} of a model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def inject(model: nn.Module, targets, rank: int = 4, alpha: float | None = None, *, exclude=(), dropout: float = 0.0,
           rank_dropout: float = 0.0, module_dropout: float = 0.0, conv_rank: int | None = None,
           conv_alpha: float | None = None, dora: bool = False, init: str = "kaiming", dtype: torch.dtype | None = None,
           rslora: bool = False) -> InjectionReport:
    """Wrap every nn.Linear / nn.Conv2d whose path matches `targets` (and no `exclude`) in a LoRALayer.

    A matched container (e.g. `attn1`) adapts every Linear/Conv2d inside it. 1x1 convs are treated
    like Linear layers; larger kernels only when `conv_rank` is given (LoCon)."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    if rank < 1:
        raise LoRAError(f"rank must be at least 1, got {rank}")
    if lora_layers(model):
        raise LoRAError("this model already has LoRA layers; call lora.remove(model) first")
    model._lora_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}  # for lora.remove
    model.requires_grad_(False)  # 1. freeze first
    hit = {p: False for p in targets}
    report = InjectionReport(0, 0, 0)
    done: dict[int, LoRALayer] = {}  # a module shared at two paths gets one adapter

    def options(base: nn.Module, path: str):
        if isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1):
            if conv_rank is None:
                report.skipped_convs.append(path)
                return None
            return conv_rank, conv_alpha if conv_alpha is not None else (alpha if conv_rank == rank else None)
        return rank, alpha

    def walk(module: nn.Module, prefix: str, inside_match: bool) -> None:
        for name, child in list(module.named_children()):
            path = f"{prefix}{name}"
            if isinstance(child, LoRALayer):
                continue
            matched = [p for p in targets if matches(path, p)]
            for p in matched:
                hit[p] = True
            selected = (inside_match or bool(matched)) and not (exclude and matches(path, exclude))
            if selected and isinstance(child, (nn.Linear, nn.Conv2d)):
                if id(child) not in done:
                    opts = options(child, path)
                    if opts is None:
                        continue
                    done[id(child)] = LoRALayer(child, opts[0], opts[1], dropout=dropout, rank_dropout=rank_dropout,
                                                module_dropout=module_dropout, dora=dora, init=init, rslora=rslora,
                                                dtype=dtype)  # 2. on the base's device
                setattr(module, name, done[id(child)])
                report.paths.append(path)
            else:
                walk(child, path + ".", selected and not isinstance(child, (nn.Linear, nn.Conv2d)))

    walk(model, "", False)
    for parent_path, parent in list(model.named_modules(remove_duplicate=False)):  # a wrapped module shared
        for name, child in list(parent.named_children()):                       # with an unmatched path
            if not isinstance(parent, LoRALayer) and id(child) in done:          # gets the same adapter there
                setattr(parent, name, done[id(child)])
                report.paths.append(f"{parent_path}.{name}" if parent_path else name)
    report.wrapped = len(report.paths)
    report.unmatched_patterns = [p for p, h in hit.items() if not h]
    if report.wrapped == 0:  # 3. never a silent no-op
        model.requires_grad_(True)
        for n, p in model.named_parameters():
            p.requires_grad_(model._lora_requires_grad.get(n, True))
        examples = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:5]
        raise LoRAError(f"LoRA targets {targets} (exclude {exclude}) matched no nn.Linear/nn.Conv2d in "
                        f"{type(model).__name__}"
                        + (f" ({len(report.skipped_convs)} kxk convs matched: pass conv_rank)" if report.skipped_convs else "")
                        + f". Layer paths look like: {examples}. See lora.matches for the pattern rules.")
    params = {id(p): p for p in model.parameters()}.values()
    report.total_params = sum(p.numel() for p in params)
    report.trainable_params = sum(p.numel() for p in params if p.requires_grad)
    return report


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (inference speed); exact inverse: `unmerge`."""
    for path, layer in lora_layers(model).items():
        _merge(layer, path)


def _merge(layer: LoRALayer, path: str, keep_original: bool = True) -> None:
    try:
        layer.merge(keep_original)
    except ValueError as e:  # e.g. a float8 base
        raise LoRAError(f"'{path}': {e}") from None


def unmerge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def set_scale(model: nn.Module, multiplier: float) -> None:
    """Runtime strength of every adapter: the weight W + s (W' - W), 1.0 = as trained; not applied
    to merged adapters."""
    for layer in lora_layers(model).values():
        layer.multiplier = multiplier


def remove(model: nn.Module) -> None:
    """Put the original modules back (unmerging first) and restore their requires_grad flags."""
    unmerge(model)
    for path, layer in lora_layers(model).items():
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, layer.base)
    flags = getattr(model, "_lora_requires_grad", {})
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))


def bake(model: nn.Module) -> None:
    """Merge every adapter into its base weight for good and drop the LoRA layers (inference with
    several LoRAs: load one, bake it, load the next)."""
    for path, layer in lora_layers(model).items():
        _merge(layer, path, keep_original=False)
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, layer.base)


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, by `<module path>.lora_down.weight` / `.lora_up.weight` / `.magnitude`."""
    out = {}
    for path, layer in lora_layers(model).items():
        out[f"{path}.lora_down.weight"] = layer.lora_down.weight
        out[f"{path}.lora_up.weight"] = layer.lora_up.weight
        if layer.magnitude is not None:
            out[f"{path}.magnitude"] = layer.magnitude
    return out
