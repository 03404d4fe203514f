from __future__ import annotations

import os
import struct

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


# --- bad input and conveniences (issue 14) -------------------------------------------------------------------------
def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture(scope="module")
def bad_models(tiny_models, tmp_path_factory):
    import math

    from fuzzing import F32, variant

    d = tmp_path_factory.mktemp("bad")
    nested = d / "nested.gguf"
    kv = struct.pack("<Q", 1) + b"a" + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 500 + struct.pack("<IQ", 4, 0)
    nested.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv + bytes(32))
    return {"inf heads": variant(tiny_models["llama"], d / "inf.gguf", {"llama.attention.head_count": (F32, math.inf)}),
            "nested": nested}


@pytest.mark.parametrize("argv, code, message", [
    (["run", "-m", "."], 1, "is a directory, not a GGUF file"),
    (["run", "-m", "/dev/null"], 1, "is not a regular file"),
    (["run", "-ngl", "abc"], 2, "argument -ngl/--npu-layers/--n-gpu-layers: expected a number of layers or 'all'"),
    (["run", "-c", "-3"], 2, "argument -c/--ctx-size: expected an integer >= 0, got -3"),
    (["run", "--top-k", "-5"], 2, "argument --top-k: expected an integer >= 0, got -5"),
    (["run", "--temp", "nan"], 2, "argument --temp: expected a finite number, got 'nan'"),
    (["run", "--top-p", "1.5"], 1, "--top-p must be in [0, 1], got 1.5"),
    (["run", "--min-p", "5"], 1, "--min-p must be in [0, 1], got 5.0"),
    (["run", "--repeat-penalty", "0"], 1, "--repeat-penalty must be > 0"),
    (["run", "--pipeline", "W16A16"], 1, "--pipeline picks the pipeline of the layers -ngl puts on the NPU"),
    (["run", "-f", "no-such-prompt.txt"], 1, "-f no-such-prompt.txt: no such file"),
    (["chat", "--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
])
def test_bad_command_lines_are_one_line_errors(argv, code, message, capsys):
    """Issue 14 items 8 and 10: each a single line naming the flag, before any model is loaded."""
    got, out, err = _run(argv, capsys)
    assert got == code and message in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("which, message", [("inf heads", "llama.attention.head_count: expected an integer"),
                                            ("nested", "nests arrays more than")])
def test_bad_models_are_one_line_errors(bad_models, which, message, capsys):
    code, out, err = _run(["run", "-m", str(bad_models[which]), "-n", "2", "--no-perf"], capsys)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("npulm: error: ") and message in last


def test_context_too_small_for_the_prompt(tiny_models, capsys):
    code, out, err = _run(["run", "-m", str(tiny_models["llama"]), "-c", "1", "-p", "the cat"], capsys)
    assert code == 1 and "tokens and the context holds 1 (-c 1): it must hold the prompt" in err


def test_invalid_utf8_prompt_from_argv_and_stdin(tiny_models, tmp_path):
    import subprocess
    import sys

    bad = os.fsdecode(b"caf\xff")  # what Python makes of such argv bytes
    r = subprocess.run([sys.executable, "-m", "npulm.cli", "run", "-m", str(tiny_models["llama"]), "-p", bad],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert r.returncode == 1 and "-p/--prompt is not valid UTF-8" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "npulm.cli", "run", "-m", str(tiny_models["llama"]), "-f", "-"],
                       input=b"caf\xff", capture_output=True, timeout=120)
    assert r.returncode == 1 and b"from standard input is not valid UTF-8 (byte 0xff at offset 3)" in r.stderr


def test_prompt_from_piped_stdin_and_the_timing_block(tiny_models):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "npulm.cli", "run", "-m", str(tiny_models["llama"]), "-n", "4",
                        "--temp", "0", "-c", "32"], input="the cat", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("the cat")
    for line in ("load time =", "prompt eval time =", "eval time =", "total time ="):
        assert "npulm_perf_context_print: " in r.stderr and line in r.stderr
    assert " /     6 tokens (" in r.stderr  # BOS + "the cat" as the tiny vocabulary spells it


def test_version_and_defaults_in_help(capsys):
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("version: ")
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: 40)" in out and "(default: 0.95)" in out and "(default: 4096)" in out


def test_info_names_the_file_type(tiny_models, tmp_path, capsys):
    from fuzzing import U32, variant

    path = variant(tiny_models["llama"], tmp_path / "ft.gguf", {"general.file_type": (U32, 15)})
    assert main(["info", str(path)]) == 0
    assert "general.file_type = 15 (Q4_K - Medium)" in capsys.readouterr().out


def test_internal_errors_are_one_line_and_traceback_with_verbose(tiny_models, monkeypatch, capsys):
    import npulm.gguf

    def boom(self, path):
        raise RuntimeError("boom")

    monkeypatch.setattr(npulm.gguf.GGUFFile, "__init__", boom)
    code, out, err = _run(["info", str(tiny_models["llama"])], capsys)
    assert code == 1 and err.strip() == "npulm: error: RuntimeError: boom (an internal error; --verbose prints the " \
                                         "traceback)"
    assert main(["info", str(tiny_models["llama"]), "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("npulm: error: RuntimeError: boom")


def test_emulated_npu_is_said(tiny_models, npu_predicted_fast, capsys):
    code, out, err = _run(["run", "-m", str(tiny_models["llama"]), "-ngl", "1", "-n", "1", "-p", "the", "--no-perf",
                           "-c", "16"], capsys)
    assert code == 0 and "npulm: warning: no librknnrt here: the NPU matmuls run on the emulator" in err
