from __future__ import annotations

import pytest

from npulm.cli import main


def test_run_greedy(tiny_models, capsys):
    assert main(["run", "-m", str(tiny_models["llama"]), "-p", "the", "-n", "5", "--temp", "0", "-c", "32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the") and len(out) > 3


def test_info(tiny_models, capsys):
    assert main(["info", str(tiny_models["llama-q8_0"])]) == 0
    out = capsys.readouterr().out
    assert "general.architecture = llama" in out and "Q8_0" in out and "parameters:" in out


def test_perplexity_on_a_text_file(tiny_models, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    assert main(["perplexity", "-m", str(tiny_models["llama"]), "-f", str(text), "-c", "32", "--chunks", "3"]) == 0
    out = capsys.readouterr().out
    assert "Final estimate: PPL = " in out and "[3]" in out


def test_chat_reads_stdin(tiny_models, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    assert main(["chat", "-m", str(tiny_models["llama"]), "-n", "3", "--temp", "0", "-c", "48"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["run", "-m", "no-such-file.gguf"], "model file not found"),
    (["info", "no-such-file.gguf"], "model file not found"),
])
def test_clear_errors(argv, message, capsys):
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_malformed_model_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(30))
    assert main(["run", "-m", str(bad)]) == 1
    assert "npulm: error:" in capsys.readouterr().err
