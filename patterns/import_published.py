"""Convert the DuoAttention authors' six published head patterns into duohead pattern files (package data).

    python patterns/import_published.py [SOURCE] [DEST]

SOURCE (default tests/data/published-patterns) holds the reference's folders unchanged (`full_attention_heads.tsv`
+ `config.json` each) and the MIT licence; DEST (default duohead/patterns) gets one folder per model with
`pattern.json` (read by duohead's own reader, `HeadPattern.from_duo_attention`, and stamped with the model's
identity and the provenance) and the licence notice. Rerun it to rebuild; tests/test_published_patterns.py checks
that the shipped files equal what it writes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from duohead.pattern import PATTERN_FILE, HeadPattern  # noqa: E402

SOURCE_REPO = "https://github.com/mit-han-lab/duo-attention"
SOURCE_COMMIT = "fe93c314"  # February 2025; the files are under attn_patterns/ there
LICENSE = "MIT, Copyright (c) 2024 MIT HAN Lab (the LICENSE file next to this pattern)"
DEFAULT_SPARSITY = 0.5  # the DuoAttention authors deploy GQA models at 50% retrieval heads; the same for all six here
# calibration settings from the reference's config.json that say how the gates were made
SETTINGS = (
    "lr",
    "reg_weight",
    "num_steps",
    "num_passkeys",
    "context_length_min",
    "context_length_max",
    "sink_size",
    "recent_size",
    "dataset_name",
    "dataset_format",
    "initial_value",
    "seed",
)

# duohead name -> (reference folder, Hugging Face id, other names of the model, model_type, head dim)
PUBLISHED = {
    "llama-2-7b-32k-instruct": ("Llama-2-7B-32K-Instruct", "togethercomputer/Llama-2-7B-32K-Instruct", [], "llama", 128),
    "llama-3-8b-instruct-gradient-1048k": (
        "Llama-3-8B-Instruct-Gradient-1048k",
        "gradientai/Llama-3-8B-Instruct-Gradient-1048k",
        [],
        "llama",
        128,
    ),
    "llama-3-8b-instruct-gradient-4194k": (
        "Llama-3-8B-Instruct-Gradient-4194k",
        "gradientai/Llama-3-8B-Instruct-Gradient-4194k",
        [],
        "llama",
        128,
    ),
    "llama-3.1-8b-instruct": (
        "Meta-Llama-3.1-8B-Instruct",
        "meta-llama/Llama-3.1-8B-Instruct",
        ["meta-llama/Meta-Llama-3.1-8B-Instruct"],
        "llama",
        128,
    ),
    "mistral-7b-instruct-v0.2": ("Mistral-7B-Instruct-v0.2", "mistralai/Mistral-7B-Instruct-v0.2", [], "mistral", 128),
    "mistral-7b-instruct-v0.3": ("Mistral-7B-Instruct-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", [], "mistral", 128),
}


def convert(name: str, source: Path) -> HeadPattern:
    """The duohead pattern of one published folder: the reference reader's gates, the model identity, provenance."""
    folder, hf_id, aliases, model_type, head_dim = PUBLISHED[name]
    imported = HeadPattern.from_duo_attention(source / folder)
    config = json.loads((source / folder / "config.json").read_text(encoding="utf-8"))
    provenance = {
        "method": "DuoAttention calibration (the authors' published pattern)",
        "source": f"{SOURCE_REPO}/tree/{SOURCE_COMMIT}/attn_patterns/{folder}",
        "source_commit": SOURCE_COMMIT,
        "license": LICENSE,
        "converted_by": "patterns/import_published.py (HeadPattern.from_duo_attention)",
        "calibration": {key: config[key] for key in SETTINGS},
        "default_sparsity_note": f"{DEFAULT_SPARSITY}: chosen by duohead (the authors deploy GQA models at 50% retrieval heads); "
        "the reference file records no target",
    }
    if "clipped" in imported.provenance:
        provenance["clipped"] = imported.provenance["clipped"]
    model = {"name": folder, "hf_id": hf_id, "aliases": aliases, "architecture": model_type, "head_dim": head_dim}
    return HeadPattern(
        imported.gates,
        sink=imported.sink,
        window=imported.window,
        model=model,
        provenance=provenance,
        default_sparsity=DEFAULT_SPARSITY,
    )


def main(source: Path, dest: Path) -> None:
    for name in PUBLISHED:
        (dest / name).mkdir(parents=True, exist_ok=True)
        convert(name, source).save(dest / name / PATTERN_FILE, overwrite=True)
        shutil.copyfile(source / "LICENSE", dest / name / "LICENSE")
        print(f"{dest / name / PATTERN_FILE}")


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]]
    main(args[0] if args else ROOT / "tests/data/published-patterns", args[1] if len(args) > 1 else ROOT / "duohead/patterns")
