r"""Which modules get an adapter: module-path matching, a pure function.

A module path is the dotted name `model.named_modules()` gives, e.g.
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`. A pattern is one of:

| pattern                  | matches                                                  | does not match            |
| ------------------------ | -------------------------------------------------------- | ------------------------- |
| `to_q`                   | `...attn1.to_q`, `to_q`                                  | `...attn1.to_q_proj`, `...q` |
| `attn2.to_k`             | `...attn2.to_k`                                          | `...attn1.to_k`           |
| `to_out.0`               | `...attn1.to_out.0`                                      | `...to_out.1`, `...to_out` |
| `attn*.to_v`             | `...attn1.to_v`, `...attn2.to_v` (`*`: within a segment) | `...attn1.sub.to_v`       |
| `down_blocks.**.to_q`    | `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` (`**`: any segments, also none) | `up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` |
| `re:.*attn1\.to_(q|k)`   | `...attn1.to_q`, `...attn1.to_k` (full match of the whole path) | `...attn1.to_v`    |

Plain names and globs match a whole dotted suffix of the path, so they never match part of a
segment. `re:` patterns are Python regular expressions that must match the entire path.
Exclude patterns use the same rules and take precedence over targets: an excluded path excludes
everything under it (`exclude=["layers.0"]` keeps every layer of `layers.0` unadapted, whether the
target is `q_proj` or `layers`). A pattern that is not valid raises LoRAError naming it.
"""

from __future__ import annotations

import functools
import re
from typing import Iterable

from .errors import LoRAError


@functools.lru_cache(maxsize=None)
def compile_pattern(pattern: str) -> re.Pattern:
    """A pattern as one anchored regular expression (see the table in the module docstring)."""
    if not isinstance(pattern, str):
        raise LoRAError(f"a LoRA target pattern must be a string, not {type(pattern).__name__} ({pattern!r})")
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as e:
            raise LoRAError(f"bad LoRA target pattern '{pattern}': not a regular expression ({e})") from None
    if not pattern or pattern.startswith(".") or pattern.endswith(".") or ".." in pattern:
        raise LoRAError(f"bad LoRA target pattern '{pattern}': expected dotted names like 'attn1.to_q'")
    parts = []
    for segment in pattern.split("."):
        if segment == "**":
            parts.append(None)  # any number of whole segments, including none
        else:
            parts.append("[^.]*".join(re.escape(s) for s in segment.split("*")))
    body = ""
    for i, part in enumerate(parts):
        if part is None:
            body += r"(?:[^.]+\.)*" if i < len(parts) - 1 else r"(?:[^.]+(?:\.[^.]+)*)?"
        else:
            body += part + (r"\." if i < len(parts) - 1 else "")
    return re.compile(r"(?:.*\.)?" + body)  # a whole dotted suffix


def matches(path: str, patterns: Iterable[str] | str) -> bool:
    """True when `path` matches any of `patterns` (a string is one pattern)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(compile_pattern(p).fullmatch(path) for p in patterns)
