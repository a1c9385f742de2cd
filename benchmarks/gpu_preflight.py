"""What a bare GPU machine has for benchmarks/gpu_check.py, checked before any GPU work (no torch import).

Rows: Python, pip, gcc / g++ / c++, Python.h (Triton builds its launcher with a C compiler and the Python headers
on first launch), nvcc, ninja and g++ (FlashInfer's JIT), FlashInfer and its prebuilt modules, $HOME, the wheels
gpu_check.sh installed, the GPU's free memory, driver and CUDA version. From them, `gates`: for each group of
rows that needs a missing prerequisite ("triton", "flashinfer"), the reason it is turned off (None: it runs).

    python benchmarks/gpu_preflight.py --out OUT [--dry-run]   # prints the table, writes OUT/preflight.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

FILE = "preflight.json"


def _first_line(command: list[str]) -> str | None:
    """The first non-empty line a command prints (stdout, else stderr), or None when it cannot run."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in (proc.stdout or proc.stderr).splitlines() if line.strip()]
    return (lines[0] if proc.returncode == 0 else f"exit {proc.returncode}: {lines[-1] if lines else ''}") if lines else None


def _tool(name: str, version_flag: str = "--version") -> tuple[str | None, str]:
    path = shutil.which(name)
    return path, (f"{path}: {_first_line([path, version_flag]) or '?'}" if path else "not found")


def nvcc() -> tuple[str | None, str]:
    """(path, "path: release line") of nvcc on PATH or under $CUDA_HOME / /usr/local/cuda."""
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = next((p for p in (shutil.which("nvcc"), os.path.join(home, "bin", "nvcc")) if p and os.path.exists(p)), None)
    if path is None:
        return None, "not found"
    try:
        lines = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout.splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        return path, f"{path}: {type(e).__name__}"
    release = [line.strip() for line in lines if "release" in line]
    return path, f"{path}: {(release or ['?'])[-1]}"


def flashinfer_prebuilt() -> tuple[bool, list[str], str]:
    """(installed, prebuilt module names, where): FlashInfer loads a module without JIT from its data/aot/<name>/."""
    spec = importlib.util.find_spec("flashinfer")
    if spec is None or spec.origin is None:
        return False, [], "flashinfer not importable"
    aot = Path(spec.origin).parent / "data" / "aot"
    names = sorted(p.name for p in aot.iterdir() if p.is_dir() and any(p.glob("*.so"))) if aot.is_dir() else []
    return True, names, str(aot)


def gpu() -> dict:
    """The first GPU as nvidia-smi sees it: name, total and free MiB, driver, CUDA version; {} without nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    query = "name,memory.total,memory.free,driver_version"
    line = _first_line([smi, f"--query-gpu={query}", "--format=csv,noheader,nounits"])
    if not line or line.startswith("exit"):
        return {"error": line or "nvidia-smi printed nothing"}
    name, total, free, driver = (part.strip() for part in line.split(","))
    header = subprocess.run([smi], capture_output=True, text=True, timeout=60).stdout
    cuda = header.split("CUDA Version:")[1].split()[0] if "CUDA Version:" in header else "?"
    return {"name": name, "total_MiB": int(total), "free_MiB": int(free), "driver": driver, "cuda": cuda}


def collect(dry_run: bool = False) -> dict:
    """Every row (name, value, ok) and the gates derived from them; `dry_run`: the CPU rehearsal (the Triton
    interpreter needs no compiler, and no GPU is expected)."""
    rows: list[dict] = []

    def row(name: str, value: str, ok: bool) -> bool:
        rows.append({"name": name, "value": value, "ok": ok})
        return ok

    row("python", sys.version.split()[0] + f" ({sys.executable})", sys.version_info >= (3, 10))
    pip = _first_line([sys.executable, "-m", "pip", "--version"])
    row("pip", pip or "not found", bool(pip) and not pip.startswith("exit"))
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    compilers = {}
    for name in ("gcc", "g++", "c++"):
        path, line = _tool(name)
        compilers[name] = row(name, line, path is not None)
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    has_header = row("Python.h", str(header) if header.is_file() else f"not found (looked in {header.parent})", header.is_file())
    nvcc_path, nvcc_line = nvcc()
    row("nvcc", nvcc_line, nvcc_path is not None)
    ninja_path, ninja_line = _tool("ninja")
    row("ninja", ninja_line, ninja_path is not None)
    home = os.environ.get("HOME", "")
    row("$HOME", home or "unset", bool(home) and os.access(home, os.W_OK))
    row(
        "wheels",
        os.environ.get("GPU_CHECK_WHEELS", "not installed by gpu_check.sh"),
        "failed" not in os.environ.get("GPU_CHECK_WHEELS", ""),
    )
    installed, modules, aot = flashinfer_prebuilt()
    row("flashinfer", "importable" if installed else "not importable", installed)
    if installed:
        prebuilt = f"{len(modules)} in {aot}: {', '.join(modules)}" if modules else f"none in {aot} (JIT)"
        row("flashinfer prebuilt", prebuilt, bool(modules))
    card = gpu()
    if card and "error" not in card:
        row("gpu", f"{card['name']}: {card['free_MiB']} of {card['total_MiB']} MiB free", True)
        row("driver / CUDA", f"{card['driver']} / {card['cuda']}", True)
    else:
        row("gpu", card.get("error", "nvidia-smi not found") + (" (dry run: none needed)" if dry_run else ""), dry_run)

    if dry_run:
        triton = None  # the interpreter compiles nothing
    elif cc is None:
        triton = "no C compiler (gcc, cc or clang; $CC): Triton cannot build its launcher"
    elif not has_header:
        triton = f"no Python.h for {sys.executable}: Triton cannot build its launcher (install python3-dev)"
    else:
        triton = None
    if dry_run:
        flashinfer = None  # gpu_check.py's warm-up subprocess crashes on purpose: the rehearsal of that failure
    elif not installed:
        flashinfer = "flashinfer not installed (no wheels in .whl/?)"
    elif modules:
        flashinfer = None
    elif nvcc_path is None or ninja_path is None or not compilers["g++"]:
        missing = [n for n, ok in (("nvcc", nvcc_path), ("ninja", ninja_path), ("g++", compilers["g++"])) if not ok]
        flashinfer = f"no prebuilt modules and no JIT toolchain (missing {', '.join(missing)})"
    else:
        flashinfer = None
    return {
        "rows": rows,
        "gates": {"triton": triton, "flashinfer": flashinfer},
        "prebuilt_flashinfer": modules,
        "gpu": card,
        "dry_run": dry_run,
    }


def table(preflight: dict) -> str:
    width = max(len(r["name"]) for r in preflight["rows"])
    lines = ["preflight"] + [f"  {'ok ' if r['ok'] else 'NO '} {r['name']:<{width}}  {r['value']}" for r in preflight["rows"]]
    lines += [f"  => {name} rows: {'run' if why is None else 'off: ' + why}" for name, why in preflight["gates"].items()]
    if preflight["dry_run"]:
        lines.append("  (dry run: no GPU; the Triton interpreter; FlashInfer's warm-up subprocess crashes on purpose)")
    return "\n".join(lines)


def load_or_collect(out: Path, dry_run: bool) -> dict:
    """OUT/preflight.json as gpu_check.sh wrote it, else collected now."""
    path = out / FILE
    return json.loads(path.read_text()) if path.is_file() else collect(dry_run)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    parser.add_argument("--dry-run", action="store_true", help="the CPU rehearsal: no GPU, the Triton interpreter")
    args, _ = parser.parse_known_args(argv)  # gpu_check.sh passes gpu_check.py's arguments along
    preflight = collect(args.dry_run)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / FILE).write_text(json.dumps(preflight, indent=1))
    print(table(preflight), flush=True)


if __name__ == "__main__":
    main()
