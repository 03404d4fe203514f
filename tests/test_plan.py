import json

import pytest

from npulm import cli
from npulm.npu import cost as C
from npulm.npu.chips import get_chip
from npulm.plan import Choice, Planner, auto_choice


@pytest.mark.parametrize("model", ["smollm2_135m:Q4_1", "gemma3_270m:Q4_K", "qwen2_5_1_5b:Q4_0"])
def test_plan_json_rows(model, capsys):
    assert cli.main(["plan", "-m", model, "-o", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rows]
    assert names[0] == "cpu" and names[-1] == "plan" and "W16A16" in names
    for r in rows:
        for key in ("name", "pp_tok_s", "tg_tok_s", "calls_per_token", "npu_bytes_per_param"):
            assert key in r
        assert r["pp_tok_s"] > 0 and r["tg_tok_s"] > 0
    assert rows[0]["calls_per_token"] == 0 and rows[0]["npu_bytes_per_param"] == 0
    by = {r["name"]: r for r in rows}
    assert by["W16A16"]["mem_views"] == 3 * by["W16A16"]["contexts"] == 3 * by["W16A16"]["calls_per_token"]
    assert by["W8A16_HADAMARD"]["contexts"] == by["W16A16"]["contexts"]  # counted before loading: one per core/chunk


def test_plan_markdown(capsys):
    assert cli.main(["plan", "-m", "qwen2_5_1_5b:Q4_0", "--chip", "rk3576", "-p", "128", "-n", "32"]) == 0
    out = capsys.readouterr().out
    assert "rk3576" in out and "pp128 / tg32" in out and "| plan |" in out


def _never_slower(pl: Planner, choices: dict, p: int) -> None:
    for li, ch in choices.items():
        for m in (1, 2, 8, 64, p):
            assert pl.linear_time(li, ch, m) <= C.cpu_linear_time(pl.c, li, m) * (1 + 1e-9), (li, ch, m)


@pytest.mark.parametrize("shape", [C.published_shape("smollm2_135m", "Q4_1"), C.published_shape("gemma3_1b", "F16"),
                                   C.published_shape("qwen2_5_1_5b", "Q8_0")])
@pytest.mark.parametrize("max_kld", [0.002, 10.0])
def test_auto_never_selects_a_slower_placement(shape, max_kld):
    pl = Planner(shape, get_chip("rk3588"))
    best = pl.best(512, 128, max_kld)
    _never_slower(pl, best, 512)
    assert (pl.kld(best) or 0.0) <= max_kld + 1e-12
    cpu = pl.speeds({}, 512, 128)
    got = pl.speeds(best, 512, 128)
    assert got["pp_tok_s"] >= cpu["pp_tok_s"] * (1 - 1e-9) and got["tg_tok_s"] >= cpu["tg_tok_s"] * (1 - 1e-9)


def test_threshold_is_a_crossover():
    pl = Planner(C.published_shape("qwen2_5_1_5b", "F16"), get_chip("rk3588"))
    li = next(li for li in pl.shape.linears if li.role == "ffn_up")
    m0 = pl.threshold("W16A16", li)
    if m0 is not None:
        assert pl.linear_time(li, Choice("W16A16"), m0) < C.cpu_linear_time(pl.c, li, m0)
        if m0 > 1:
            below = m0 // 2
            assert pl.linear_time(li, Choice("W16A16"), below) >= C.cpu_linear_time(pl.c, li, below)


def test_auto_choice_is_cpu_or_faster(tiny_models):
    from npulm.gguf import GGUFFile
    from npulm.linear import Weight

    g = GGUFFile(tiny_models["llama-q4_0"])
    w = Weight.from_gguf(g, "blk.0.ffn_up.weight")
    chip = get_chip("rk3588")
    ch = auto_choice(w, chip)
    li = C.LinearShape("ffn_up", w.n_in, w.n_out, w.type.name)
    pl = Planner(C.ModelShape("w", 1, (li,), li, 1), chip)
    if ch.pipeline is None:  # no measured pipeline within the budget is ever faster: the CPU
        assert all(pl.threshold(name, li) is None for name in ("W16A16", "W8A16_HADAMARD"))
    else:
        assert pl.linear_time(li, ch, 512) < C.cpu_linear_time(pl.c, li, 512)
        _never_slower(pl, {li: ch}, 512)
