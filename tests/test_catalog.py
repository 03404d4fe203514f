"""Models by name without a hub: from_pretrained's resolution, npulm list / rm on a private cache."""

from __future__ import annotations

import pytest

from npulm import assets, catalog
from npulm.cli import main


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NPULM_CACHE", str(tmp_path))
    return tmp_path


def test_from_pretrained_names_resolve_or_say_no_hub(cache, tiny_models):
    target = catalog.models_dir() / "my-model.Q8_0.gguf"
    target.write_bytes(tiny_models["llama"].read_bytes())
    assert catalog.resolve_pretrained("someone/my-model-GGUF", "*Q8_0.gguf") == target
    with pytest.raises(assets.AssetError, match="no model hub"):
        catalog.resolve_pretrained("meta-llama/Llama-3-8B-GGUF", "*Q4_K_M.gguf")
    from npulm.api import Llama

    assert Llama.from_pretrained("someone/my-model-GGUF", "my-model.*", verbose=False).n_vocab() > 0


def test_list_and_rm(cache, tiny_models, capsys):
    (catalog.models_dir() / "extra.gguf").write_bytes(tiny_models["llama"].read_bytes())
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "extra" in out and assets.SMOLLM2 in out
    assert main(["rm", "extra"]) == 0
    assert not (catalog.models_dir() / "extra.gguf").exists()
    assert main(["rm", "extra"]) == 1  # nothing left: a one-line error
