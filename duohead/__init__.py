"""duohead: per-head KV caches for long-context inference (retrieval heads: full KV; streaming heads: sink + window).

    import duohead
    model = duohead.from_pretrained("path/to/model", pattern="patterns/smollm2-135m-instruct/pattern.json", sparsity=0.5)
    model.generate(**inputs)   # uses a DuoCache

Importing duohead registers the "duohead" attention with transformers; it changes no model.
"""

from duohead.attention import ATTENTION_NAME, register
from duohead.cache import DuoCache
from duohead.hook import disable, enable, from_pretrained, is_enabled
from duohead.pattern import HeadPattern

register()

__version__ = "0.1.0"
__all__ = ["ATTENTION_NAME", "DuoCache", "HeadPattern", "disable", "enable", "from_pretrained", "is_enabled"]
