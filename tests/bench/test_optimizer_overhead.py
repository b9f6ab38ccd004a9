"""``python -m bench.optimizer_overhead`` on the tiny model: the e2e step reads nothing back to the host, on the CPU
path and on the Triton path, and the counters can see what the plain step does read."""
import json

from bench import optimizer_overhead as O
from tests.quant.ptq_utils import one_thread  # noqa: F401


def test_e2e_step_has_no_host_sync(tmp_path, capsys):
    out, md = tmp_path / "oo.json", tmp_path / "OPTIMIZER.md"
    assert O.main(["--models", "tiny", "--batch", "2", "--repeats", "1", "--json", str(out), "--md", str(md)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    e, t, p = r["e2e"], r["e2e"]["triton_path"], r["plain"]
    assert e["syncs"] == 0 and t["syncs"] == 0, (e["top_ops"], t.get("top_ops"))
    assert p["syncs"] > 0  # torch.optim.Adam reads each parameter's step count: the counter sees syncs
    assert t["launches_total"] > 0 and {"packed_gemm_kernel", "fake_quantize_bwd_kernel"} <= set(t["launches"])
    assert 0 < p["dispatched_ops"] < e["dispatched_ops"] <= e["aten_ops"]
    assert r["ratios"]["dispatched_ops"] == e["dispatched_ops"] / p["dispatched_ops"]
    # counted, not timed: the step a GPU runs (the Triton path) stays within 2.5x the plain step's aten ops
    assert t["aten_ops"] <= 2.5 * p["aten_ops"], (t["aten_ops"], p["aten_ops"], t["top_ops"])
    table = capsys.readouterr().out
    assert "e2e (Triton path)" in table and "plain fp32" in table
    rows = [line for line in md.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 4 and len({line.count("|") for line in rows}) == 1  # header + three steps, aligned
    assert f"| {t['dispatched_ops']:,} |" in rows[3] and "| e2e (Triton path) |" in rows[3]


def test_bad_arguments_exit_2(capsys):
    assert O.main(["--models", "tiny", "--batch", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
