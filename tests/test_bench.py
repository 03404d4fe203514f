"""`npulm bench` on tiny models: output formats, rows of the cartesian product, sane figures (not speed)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from npulm.bench import CSV_FIELDS, MD_COLUMNS, int_list, placements
from npulm.cli import main


def bench(capsys, *argv: str) -> str:
    assert main(["bench", *argv]) == 0
    return capsys.readouterr().out


def test_json_rows_and_fields(tiny_models, capsys):
    rows = json.loads(bench(capsys, "-m", str(tiny_models["llama-q8_0"]), "-p", "16", "-n", "8", "-r", "2",
                            "-o", "json"))
    assert [(r["n_prompt"], r["n_gen"]) for r in rows] == [(16, 0), (0, 8)]
    for r in rows:
        assert r["model_type"] == "llama 93K Q8_0"
        assert r["backends"] == "CPU" and r["npu_matmuls"] == "0/15" and r["n_threads"] == 2
        assert r["model_n_params"] > 0 and 0 < r["model_size"] < tiny_models["llama-q8_0"].stat().st_size
        assert len(r["samples_ns"]) == len(r["samples_ts"]) == 2
        assert all(ts > 0 for ts in r["samples_ts"]) and r["avg_ts"] > 0 and r["stddev_ts"] >= 0
        n = r["n_prompt"] or r["n_gen"]
        assert r["avg_ts"] == pytest.approx(sum(r["samples_ts"]) / 2, rel=1e-3)
        assert r["samples_ts"][0] == pytest.approx(n / (r["samples_ns"][0] * 1e-9), rel=1e-3)
        assert r["load_s"] > 0 and 0 < r["load_rss_mb"] <= r["peak_rss_mb"]


def test_csv_comma_lists_make_the_product(tiny_models, capsys):
    models = f"{tiny_models['llama']},{tiny_models['qwen2']}"
    out = bench(capsys, "-m", models, "-p", "8,16", "-n", "4", "-t", "1,2", "-r", "2", "-o", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == list(CSV_FIELDS)
    assert len(rows) == 2 * 2 * 3  # models x threads x (pp8, pp16, tg4)
    seen = {(r["model_type"].split()[0], r["n_threads"], r["n_prompt"], r["n_gen"]) for r in rows}
    assert len(seen) == len(rows)
    assert {r["model_type"].split()[0] for r in rows} == {"llama", "qwen2"}
    assert all(float(r["avg_ts"]) > 0 for r in rows)


def test_md_table(tiny_models, capsys):
    out = bench(capsys, "-m", str(tiny_models["gemma3"]), "-p", "16", "-n", "8", "-r", "2", "-o", "md")
    lines = out.strip().splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == list(MD_COLUMNS)
    assert len(lines) == 4
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[5] for c in cells] == ["pp16", "tg8"]
    for c in cells:
        assert c[0].startswith("gemma3 ") and c[1].endswith("MiB") and c[3] == "CPU" and c[4] == "2"
        mean, sd = c[6].split(" ± ")
        assert float(mean) > 0 and float(sd) >= 0


def test_zero_disables_a_test(tiny_models, capsys):
    rows = json.loads(bench(capsys, "-m", str(tiny_models["llama"]), "-p", "0", "-n", "4", "-r", "1", "-o", "json"))
    assert [(r["n_prompt"], r["n_gen"]) for r in rows] == [(0, 4)]
    assert main(["bench", "-m", str(tiny_models["llama"]), "-p", "0", "-n", "0"]) == 1
    assert "nothing to run" in capsys.readouterr().err


def test_npu_rows_name_the_pipeline(tiny_models, npu_predicted_fast, capsys):
    rows = json.loads(bench(capsys, "-m", str(tiny_models["llama-q8_0"]), "-p", "8", "-n", "0", "-r", "1",
                            "-ngl", "0,all", "-o", "json"))
    assert [r["backends"] for r in rows][0] == "CPU"
    npu = rows[1]
    assert npu["backends"].startswith("NPU:") and npu["npu_matmuls"] == "15/15" and npu["n_npu_layers"] == "all"
    from npulm.npu.rknn import find_library

    assert npu["backends"].endswith("[emulated]") == (find_library() is None)


def test_list_parsing():
    assert int_list(["512", "1,2"]) == [512, 1, 2]
    with pytest.raises(ValueError):
        int_list("12x")
    # with nothing on the NPU the pipeline list collapses to one CPU placement
    assert len(placements(["0"], ["W16A16", "W8A8_HADAMARD"], [], None)) == 1
    assert len(placements(["0", "2"], ["W16A16", "W8A8_HADAMARD"], [], None)) == 3


def test_depth_runs_after_untimed_context(tiny_models, capsys, monkeypatch):
    """-d D: every test starts from D context tokens (llama-bench's n_depth); the context is not timed."""
    from npulm import bench as bench_mod

    contexts = []
    real_gen = bench_mod.time_gen

    def spy(llm, tokens, context=()):
        seconds = real_gen(llm, tokens, context)
        contexts.append((len(context), llm.n_tokens))
        return seconds

    monkeypatch.setattr(bench_mod, "time_gen", spy)
    out = bench(capsys, "-m", str(tiny_models["llama"]), "-p", "0", "-n", "3", "-d", "0,10", "-r", "1", "-o", "md")
    assert [line.split("|")[6].strip() for line in out.splitlines()[2:]] == ["tg3", "tg3 @ d10"]
    assert contexts == [(0, 3), (0, 3), (10, 13), (10, 13)]  # warm-up and timed run per depth
    rows = json.loads(bench(capsys, "-m", str(tiny_models["llama"]), "-p", "4", "-n", "0", "-d", "6", "-r", "1",
                            "-o", "json"))
    assert [(r["n_prompt"], r["n_depth"]) for r in rows] == [(4, 6)]
    assert main(["bench", "-m", str(tiny_models["llama"]), "-d", "-1"]) == 1
