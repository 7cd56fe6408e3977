"""Put LoRA layers into any nn.Module, and take them out again.

`inject` works in an order that makes the classic bugs impossible:
  1. select: one walk that knows each module's full path (an excluded path excludes everything
     under it; see lora.matching);
  2. check everything before anything changes: a grouped conv, a float8 base under DoRA, a pattern
     that only finds layers lora/ cannot wrap (nn.Embedding, norms) is a LoRAError naming the path
     and its type, and the model is untouched;
  3. build the adapters, each on its base layer's device (fp32 beside a bf16/fp16/float8 base, or
     `dtype`), so none is left on the CPU while the model is on the GPU;
  4. freeze the model's own parameters, then attach the adapters: only adapter parameters train;
  5. never a silent no-op: targets that match nothing are an error listing the patterns.

A module reachable at two paths is one layer: wrapped, loaded, merged and removed once, counted once.
Several adapters may sit on one model, each with its `name`: a new one wraps the layer already
there (`layer.base` is then the older adapter), and every function here takes `name=` to act on
one adapter only, leaving the others as they are.

Merging (`merge`, `unmerge`, `bake`) and strength (`set_scale`, `disabled`) keep one invariant: a
merged adapter's base weight is W + s (W' - W) for its strength s at the time, and unmerging puts back
the exact W. Changing the strength of a merged adapter unmerges, changes and merges again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .errors import LoRAError
from .layer import FLOAT8, LoRALayer, innermost, supported
from .matching import compile_pattern, matches


@dataclass
class InjectionReport:
    """What `inject` did."""

    wrapped: int  # layers that got an adapter (a module reachable at two paths counts once)
    trainable_params: int
    total_params: int
    paths: list[str] = field(default_factory=list)  # every path of the wrapped layers
    unmatched_patterns: list[str] = field(default_factory=list)  # targets that matched no module
    skipped_convs: list[str] = field(default_factory=list)  # matched kxk convs, adapted only with conv_rank
    unsupported: dict[str, list[str]] = field(default_factory=dict)  # pattern -> ["path (Type)"] not wrappable
    name: str = "default"

    def __str__(self) -> str:
        s = (f"{self.wrapped} layers adapted, {self.trainable_params:,} trainable of {self.total_params:,} parameters "
             f"({100 * self.trainable_params / max(self.total_params, 1):.3f}%)")
        if self.unmatched_patterns:
            s += f"; patterns that matched nothing: {self.unmatched_patterns}"
        if self.skipped_convs:
            s += f"; {len(self.skipped_convs)} matched kxk convs skipped (pass conv_rank to adapt them)"
        if self.unsupported:
            s += "; not wrappable, skipped: " + ", ".join(f"'{p}': {v}" for p, v in self.unsupported.items())
        return s


def lora_layers(model: nn.Module, name: str | None = None) -> dict[str, LoRALayer]:
    """{module path: LoRALayer} of a model (of the adapter `name` only, when given). An adapter
    stacked on another one sits at `<path>.base`; `adapted_paths` gives the model's own paths."""
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALayer) and (name is None or m.name == name)}


def adapted_paths(model: nn.Module, name: str) -> dict[str, LoRALayer]:
    """{path of the adapted layer in the model: adapter `name`'s LoRALayer there}, stacks looked through
    (the first path of a module reachable at two)."""
    out, seen = {}, set()

    def walk(module: nn.Module, prefix: str) -> None:
        for attr, child in module.named_children():
            path = prefix + attr
            if isinstance(child, LoRALayer):
                layer = child
                while isinstance(layer, LoRALayer):
                    if layer.name == name and id(layer) not in seen:
                        seen.add(id(layer))
                        out[path] = layer
                    layer = layer.base
            else:
                walk(child, path + ".")

    walk(model, "")
    return out


def _depth(layer: LoRALayer) -> int:
    """How many adapters sit under this one."""
    n, m = 0, layer.base
    while isinstance(m, LoRALayer):
        n, m = n + 1, m.base
    return n


def _ordered(model: nn.Module, name: str | None = None, inner_first: bool = True) -> list[tuple[str, LoRALayer]]:
    """The adapters, those nearest their base layer first (or last)."""
    return sorted(lora_layers(model, name).items(), key=lambda kv: _depth(kv[1]), reverse=not inner_first)


def _kind(module: nn.Module) -> str:
    return type(module).__name__


def inject(model: nn.Module, targets, rank: int = 4, alpha: float | None = None, *, exclude=(), dropout: float = 0.0,
           rank_dropout: float = 0.0, module_dropout: float = 0.0, conv_rank: int | None = None,
           conv_alpha: float | None = None, dora: bool = False, init: str = "kaiming", dtype: torch.dtype | None = None,
           rslora: bool = False, name: str = "default", skip_unsupported: bool = False) -> InjectionReport:
    """Wrap every supported layer (nn.Linear, nn.Conv1d, nn.Conv2d, transformers' Conv1D) whose path
    matches `targets` (and no `exclude`) in a LoRALayer named `name`.

    A matched container (e.g. `attn1`) adapts every supported layer inside it. 1x1 convs are treated
    like Linear layers; larger kernels only when `conv_rank` is given (LoCon). A pattern that matches
    modules with a weight that lora/ cannot wrap (nn.Embedding, transformers' Conv1D is fine, norms...)
    and no supported layer is an error naming them and their type, unless `skip_unsupported`. Layers
    that already have an adapter get this one on top (`name` must be new). All or nothing."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    for p in targets + exclude:
        compile_pattern(p)  # a bad pattern is a LoRAError naming it
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise LoRAError(f"rank must be at least 1, got rank={rank}, conv_rank={conv_rank}")
    if init not in ("kaiming", "gaussian"):
        raise LoRAError(f"init must be 'kaiming' or 'gaussian', not '{init}'")
    existing = lora_layers(model)
    if any(layer.name == name for layer in existing.values()):
        raise LoRAError(f"this model already has an adapter named '{name}': lora.remove(model, '{name}') first, "
                        f"or pass another name= to stack a second adapter")

    # 1. Select, touching nothing: (layer, its path, the patterns that chose it)
    found: dict[str, list[str]] = {p: [] for p in targets}  # pattern -> ["path (Type)"] it matched by name
    selected, excluded = [], {}

    def walk(module: nn.Module, prefix: str, via: list[str]) -> None:
        for attr, child in module.named_children():
            path = prefix + attr
            if exclude and matches(path, exclude):  # an excluded path excludes everything under it
                excluded.update((id(m), path) for m in child.modules())
                continue
            matched = [p for p in targets if matches(path, p)]
            for p in matched:
                found[p].append(f"{path} ({_kind(innermost(child))})")
            chosen = via + [p for p in matched if p not in via]  # every pattern that chose it, a container's too
            if chosen and supported(innermost(child)):
                selected.append((child, path, chosen))
            elif not isinstance(child, LoRALayer):  # an adapter that was not chosen: left alone
                walk(child, path + ".", chosen)  # a container: everything supported inside it

    walk(model, "", [])

    # 2. Check every selected layer before anything changes
    problems: dict[str, list[str]] = {}  # reason -> ["path (Type)"]
    skipped, plans, wraps, skips = [], {}, {p: 0 for p in targets}, {p: 0 for p in targets}
    for child, path, chosen in selected:
        base = innermost(child)
        kxk = isinstance(base, (nn.Conv1d, nn.Conv2d)) and any(k != 1 for k in base.kernel_size)
        if kxk and conv_rank is None:
            skipped.append(path)
            for p in chosen:
                skips[p] += 1
            continue
        where = f"{path} ({_kind(base)})"
        if id(child) in excluded:
            problems.setdefault(f"the same module as '{excluded[id(child)]}', which exclude= keeps out (a module at "
                                f"two paths is one layer, adapted at both or neither)", []).append(where)
        if getattr(base, "groups", 1) != 1:
            problems.setdefault("grouped convolutions cannot take an adapter", []).append(f"{where}, groups={base.groups}")
        elif dora and base.weight.dtype in FLOAT8:
            problems.setdefault(f"DoRA reads its base weight, which is stored in {base.weight.dtype} here",
                                []).append(where)
        for p in chosen:
            wraps[p] += 1
        r, a = (conv_rank, conv_alpha if conv_alpha is not None else (alpha if conv_rank == rank else None)) if kxk \
            else (rank, alpha)
        plans.setdefault(id(child), (child, path, r, a))
    errors = [f"{reason}: {', '.join(where[:3])}" + (f" and {len(where) - 3} more" if len(where) > 3 else "")
              for reason, where in problems.items()]
    # what a pattern found by name when nothing under it can take an adapter (kxk convs: skipped_convs)
    unsupported = {p: v for p, v in found.items() if v and not wraps[p] and not skips[p]}
    if unsupported and not skip_unsupported:
        for p, v in unsupported.items():
            types = ", ".join(sorted({x.rsplit(" (", 1)[1][:-1] for x in v}))
            errors.append(f"'{p}' matched {len(v)} module{'s' * (len(v) > 1)} of type {types}, which lora/ cannot wrap, "
                          f"with nothing inside that it can (it wraps nn.Linear, nn.Conv1d, nn.Conv2d and "
                          f"transformers' Conv1D): {v[:3]}")
    if errors:
        raise LoRAError("nothing was changed: " + "; ".join(errors)
                        + ("; pass skip_unsupported=True to adapt the rest" if unsupported else ""))
    if not plans:
        examples = [n for n, m in model.named_modules() if supported(m)][:5]
        raise LoRAError(f"LoRA targets {targets} (exclude {exclude}) matched no nn.Linear/nn.Conv1d/nn.Conv2d/Conv1D in "
                        f"{type(model).__name__}"
                        + (f" ({len(skipped)} kxk convs matched: pass conv_rank)" if skipped else "")
                        + f". Layer paths look like: {examples}. See lora.matches for the pattern rules.")

    # 3. Build the adapters (still detached from the model)
    layers = {}
    for key, (child, path, r, a) in plans.items():
        try:
            layers[key] = LoRALayer(child, r, a, dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
                                    dora=dora, init=init, rslora=rslora, dtype=dtype, name=name)
        except LoRAError as e:
            raise LoRAError(f"nothing was changed: {path} ({_kind(innermost(child))}): {e}") from None

    # 4. Freeze the model's own parameters (and older adapters), then 5. attach at every path of each layer
    if not existing:
        model._lora_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}  # for lora.remove
    model.requires_grad_(False)
    paths = _replace(model, layers)
    report = InjectionReport(len(layers), 0, 0, paths=paths, name=name, skipped_convs=skipped, unsupported=unsupported)
    report.unmatched_patterns = [p for p, v in found.items() if not v]
    params = {id(p): p for p in model.parameters()}.values()
    report.total_params = sum(p.numel() for p in params)
    report.trainable_params = sum(p.numel() for p in params if p.requires_grad)
    return report


def _replace(model: nn.Module, new: dict[int, nn.Module]) -> list[str]:
    """Put new[id(old)] wherever `old` sits in the model, at every path, in one walk (a chain
    old -> new -> newer ends at the last); returns the paths."""
    paths = []
    for parent_path, parent in list(model.named_modules(remove_duplicate=False)):
        for attr, child in list(parent._modules.items()):  # not named_children: it skips a second alias
            if child is not None and id(child) in new:
                while id(child) in new:
                    child = new[id(child)]
                setattr(parent, attr, child)
                paths.append(f"{parent_path}.{attr}" if parent_path else attr)
    return paths


def _tied(model: nn.Module) -> dict[int, list[str]]:
    """{id(parameter): paths of the modules holding it} for parameters held by more than one module."""
    owners: dict[int, dict[int, str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), {}).setdefault(id(module), f"{path}.{pname}" if path else pname)
    return {k: list(v.values()) for k, v in owners.items() if len(v) > 1}


def _check_mergeable(model: nn.Module, todo: list[tuple[str, LoRALayer]], verb: str) -> None:
    """Everything that would stop `verb` ("merge" or "bake") of `todo`, found before any weight changes."""
    tied, ids, doing = _tied(model), {id(layer) for _, layer in todo}, verb[:-1] + "ing"
    for path, layer in todo:
        w = innermost(layer).weight
        if id(w) in tied and not layer.merged:
            raise LoRAError(f"'{path}': its weight is tied to {tied[id(w)]}; {doing} it would change them all. Keep the "
                            f"adapter as a separate layer (or untie the weights first)")
        if w.dtype in FLOAT8:
            raise LoRAError(f"'{path}': cannot merge into a base weight stored in {w.dtype}: keep the adapter as a "
                            f"separate layer, or merge before the weights are stored in float8")
        under = layer.base
        if isinstance(under, LoRALayer) and id(under) not in ids and (verb == "bake" or not under.merged):
            raise LoRAError(f"'{path}': adapter '{layer.name}' sits on adapter '{under.name}'"
                            + (", which is not merged" if verb == "merge" else "") + f": {verb} '{under.name}' too")


@contextlib.contextmanager
def _unmerged(model: nn.Module, keep_unmerged: set[int] = frozenset()):
    """Unmerge every adapter for the body (outermost first: each puts back the weight it replaced),
    then merge again, innermost first, those that were merged and are still in the model."""
    was = [layer for _, layer in _ordered(model) if layer.merged]
    for layer in reversed(was):
        layer.unmerge()
    try:
        yield
    finally:
        present = {id(layer) for layer in lora_layers(model).values()}
        for layer in was:
            if id(layer) in present and id(layer) not in keep_unmerged:
                layer.merge()


def merge(model: nn.Module, name: str | None = None) -> None:
    """Fold every adapter (or `name`'s) into its base weight at its strength; `unmerge` restores the
    exact weights (a copy of each is kept; `bake` keeps none). Refused, before anything changes: a
    weight tied to another module (lm_head and the embeddings: merging would change the other module
    too), a float8 base, an adapter on an unmerged one of another name."""
    todo = _ordered(model, name)
    _check_mergeable(model, todo, "merge")
    for _, layer in todo:
        layer.merge()


def unmerge(model: nn.Module, name: str | None = None) -> None:
    """Put back the exact weights `merge` replaced: every adapter's, or `name`'s and those of the
    adapters stacked on it (their merge was computed on top of it); the others stay merged."""
    mine = {id(layer) for layer in lora_layers(model, name).values()}
    above = set()
    for layer in lora_layers(model).values():
        under = layer.base
        while isinstance(under, LoRALayer):
            if id(under) in mine:
                above.add(id(layer))
            under = under.base
    with _unmerged(model, keep_unmerged=mine | above):
        pass


def set_scale(model: nn.Module, multiplier: float, name: str | None = None) -> None:
    """Runtime strength of every adapter (or `name`'s): the weight W + s (W' - W), 1.0 = as trained.
    A merged adapter is unmerged, scaled and merged again, so the base weight always says what it holds."""
    layers = lora_layers(model, name).values()
    if not layers:
        raise LoRAError(f"the model has no adapter{f' named {name!r}' if name else 's'} to scale")
    with _unmerged(model) if any(layer.merged for layer in lora_layers(model).values()) else contextlib.nullcontext():
        for layer in layers:
            layer.multiplier = multiplier


@contextlib.contextmanager
def disabled(model: nn.Module, name: str | None = None):
    """`with lora.disabled(model):` the base model's output (without `name`'s adapter, or any),
    merged or not; afterwards every adapter is as it was (strength, merged state)."""
    layers = list(lora_layers(model, name).values())
    saved = [layer.multiplier for layer in layers]
    with _unmerged(model):
        for layer in layers:
            layer.multiplier = 0.0
        try:
            yield model
        finally:
            for layer, m in zip(layers, saved):
                layer.multiplier = m


def remove(model: nn.Module, name: str | None = None) -> None:
    """Put the original modules back (every adapter, or only `name`'s: the others stay, merged or not),
    with their exact weights. Once no adapter is left, every parameter's requires_grad is what it was
    before the first `inject`."""
    with _unmerged(model):
        _replace(model, {id(layer): layer.base for layer in lora_layers(model, name).values()})
    if not lora_layers(model):
        flags = getattr(model, "_lora_requires_grad", {})
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))


def bake(model: nn.Module, name: str | None = None) -> None:
    """Merge every adapter (or `name`'s) into its base weight for good and drop its LoRA layers
    (inference with several LoRAs: load one, bake it, load the next). No copy of the old weight is
    kept. The same refusals as `merge`, before anything changes."""
    todo = _ordered(model, name)
    _check_mergeable(model, todo, "bake")
    with _unmerged(model, keep_unmerged={id(layer) for _, layer in todo}):
        for _, layer in todo:
            layer.merge(keep_original=False)
        _replace(model, {id(layer): layer.base for _, layer in todo})


def init_adapters(model: nn.Module, init: str = "kaiming") -> None:
    """Initialise every adapter again (down random, up zero, DoRA's magnitude from the base weight).
    A model injected on the meta device and materialised with `to_empty()` holds uninitialised memory
    in its adapters: load the base weights (a state dict without adapters loads into the wrapped
    model with strict=False), then call this."""
    for layer in lora_layers(model).values():
        if layer.merged:
            raise LoRAError("init_adapters on a merged model: unmerge it first")
        layer.reset_parameters(init)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of everything that trains (each shared parameter once): what an optimizer takes."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def summary(model: nn.Module) -> str:
    """One line: the adapters on a model, their strengths and what trains."""
    layers = lora_layers(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in trainable_parameters(model).values())
    adapters = []
    for name in sorted({layer.name for layer in layers.values()}):
        mine = [layer for layer in layers.values() if layer.name == name]
        scales = sorted({layer.multiplier for layer in mine})
        merged = sum(layer.merged for layer in mine)
        adapters.append(f"'{name}' on {len(mine)} layers" + (f" at strength {scales[0]:g}" if len(scales) == 1 else "")
                        + (f", {merged} merged" if merged else ""))
    return (f"{'; '.join(adapters) or 'no adapters'}: {trainable:,} trainable of {total:,} parameters "
            f"({100 * trainable / max(total, 1):.3f}%)")


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, by `<module path>.lora_down.weight` / `.lora_up.weight` / `.magnitude`."""
    out = {}
    for path, layer in lora_layers(model).items():
        out[f"{path}.lora_down.weight"] = layer.lora_down.weight
        out[f"{path}.lora_up.weight"] = layer.lora_up.weight
        if layer.magnitude is not None:
            out[f"{path}.magnitude"] = layer.magnitude
    return out
