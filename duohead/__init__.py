"""duohead: per-head KV caches for long-context inference (retrieval heads: full KV; streaming heads: sink + window).

    import duohead
    model = duohead.from_pretrained("meta-llama/Llama-3.1-8B-Instruct", pattern="auto")  # the shipped pattern for it
    model.generate(**inputs)   # uses a DuoCache

`import duohead` imports neither torch nor transformers (so the `duohead` command answers a bad argument at
once): each public name loads its module on first use (PEP 562). `duohead.enable` registers the "duohead"
attention with transformers; `duohead.register()` does only that. Importing changes no model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from duohead.attention import ATTENTION_NAME, register
    from duohead.cache import DuoCache
    from duohead.hook import disable, enable, from_pretrained, is_enabled
    from duohead.pattern import HeadPattern

_HOME = {  # public name -> the module that defines it
    "ATTENTION_NAME": "duohead.attention",
    "register": "duohead.attention",
    "DuoCache": "duohead.cache",
    "HeadPattern": "duohead.pattern",
    "disable": "duohead.hook",
    "enable": "duohead.hook",
    "from_pretrained": "duohead.hook",
    "is_enabled": "duohead.hook",
}

__version__ = "0.1.0"
__all__ = ["ATTENTION_NAME", "DuoCache", "HeadPattern", "disable", "enable", "from_pretrained", "is_enabled", "register"]


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use, then keep it here (PEP 562)."""
    if name not in _HOME:
        raise AttributeError(f"module 'duohead' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
