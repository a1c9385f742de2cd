"""The `duohead` key of a vLLM model config: what the user asked for, checked, and the layout it gives.

A user enables duohead in vLLM by naming a pattern in the model's config overrides:

    LLM(model=path, hf_overrides={"duohead": {"pattern": "auto", "sparsity": 0.5}})

The keys are `duohead.enable`'s arguments: `pattern` (required: a shipped name, "auto", a file or a folder),
`sparsity` / `threshold` / `sink` / `window` (optional, defaulting as in `enable`). This module imports nothing
of vLLM, so the rules are tested with the rest of duohead.
"""

from __future__ import annotations

from typing import Any

from duohead.architecture import check_architecture, text_config
from duohead.deployment import Deployment, deploy

CONFIG_KEY = "duohead"
SETTINGS = ("pattern", "sparsity", "threshold", "sink", "window")


def requested(config: Any) -> dict[str, Any] | None:
    """The `duohead` settings of a transformers config, or None when the model runs without duohead."""
    settings = getattr(text_config(config), CONFIG_KEY, None)
    if settings is None:
        settings = getattr(config, CONFIG_KEY, None)
    return settings


def deployment_for(config: Any) -> Deployment:
    """The checked deployment that the `duohead` settings of `config` ask for.

    Raises ValueError with one line naming the setting and what was expected."""
    settings = requested(config)
    where = "vLLM hf_overrides['duohead']"
    if not isinstance(settings, dict):
        raise ValueError(f"{where} must be a dict such as {{'pattern': 'auto', 'sparsity': 0.5}}; got {settings!r}")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; the keys are {', '.join(SETTINGS)}")
    if "pattern" not in settings:
        raise ValueError(f"{where} needs 'pattern': a shipped pattern name, 'auto', a pattern file or folder")
    check_architecture(getattr(text_config(config), "model_type", None), what="duohead's vLLM plugin", vllm=True)
    options = {key: settings.get(key) for key in SETTINGS[1:]}
    try:
        return deploy(settings["pattern"], text_config(config), **options)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{where}: {e}") from None
