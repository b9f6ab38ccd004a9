"""``python -m bench.accuracy`` end to end on a tiny configuration: JSON, generated markdown, plot, resume."""
import json
import os
import re

import pytest

from bench import accuracy as A
from tests.quant.ptq_utils import one_thread  # noqa: F401 (autouse: one intra-op thread)



@pytest.fixture
def cifar_small(tmp_path, cifar_root):
    """A CIFAR-10-shaped root whose train/ links 3 of the generated root's images per class and whose test/ is
    the generated one."""
    root = tmp_path / "cifar"
    for cls in sorted(os.listdir(cifar_root / "train")):
        (root / "train" / cls).mkdir(parents=True)
        for name in sorted(os.listdir(cifar_root / "train" / cls))[:3]:
            (root / "train" / cls / name).symlink_to((cifar_root / "train" / cls / name).resolve())
    (root / "test").symlink_to((cifar_root / "test").resolve())
    return root


def _rows(md: str):
    """``{(bits, method): [cells]}`` of the main table, and the FP row."""
    table = md.split("\n## ")[0]
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| bits"):
            c = [x.strip() for x in line.strip("|").split("|")]
            rows[(c[0], c[1])] = c[2:]
    return rows


def test_accuracy_script_end_to_end(cifar_small, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench"
    argv = ["--data", str(cifar_small), "--out", str(out), "--bits", "w4a4,w1.58a8", "--methods", "rtn,e2e",
            "--iters", "2", "--val-size", "20", "--sweep-val-size", "20", "--calib-size", "16", "--invert-steps", "2",
            "--correction-iters", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu",
            "--sweep-bits", "w4a4", "--sweep-methods", "e2e,blockwise", "--sizes", "8,16", "--no-progress"]
    assert A.main(argv) == 0
    res = json.loads((out / "accuracy.json").read_text())
    cells = res["cells"]
    assert len(cells) == 2 * 2 * 2 + 1 * 2 * 2
    for r in cells.values():
        assert r["val_images"] == 20 and 0 <= r["top1"] <= 100 and r["time_s"] > 0
        assert r["calib_images"] == r["calib_size"] and (r["steps"] == 0) == (r["method"] == "rtn")
        assert "--val-size" in r["argv"] and r["argv"][r["argv"].index("--bits") + 1] == r["bits"]
    assert all("--act-correction" not in r["argv"] for r in cells.values())
    assert cells["table/w4a4/rtn/free/16"]["argv"][cells["table/w4a4/rtn/free/16"]["argv"].index("--data") + 1] \
        == "invert"
    assert {r["calib_size"] for r in cells.values() if r["kind"] == "sweep"} == {8, 16}
    twin = cells["sweep/w4a4/e2e/real/16"]
    assert twin["reused_from"] == "table/w4a4/e2e/real/16" and twin["top1"] == cells[twin["reused_from"]]["top1"]
    assert sum("reused_from" in r for r in cells.values()) == 1
    assert len({r["fp_top1"] for r in cells.values()}) == 1
    assert res["invert_time_s"]["smooth-16"] > 0
    assert sorted(os.listdir(out / ".accuracy-work")) == ["invert-smooth-16-2-0", "invert-smooth-16-2-0.done"]
    assert all(r["argv"][r["argv"].index("--invert-prior") + 1] == "smooth" for r in cells.values()
               if r["source"] == "free")
    assert not (tmp_path / "runs").exists()

    md = (out / "ACCURACY.md").read_text()
    rows = _rows(md)
    first = next(line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| bits"))
    assert first.startswith("| FP32 |")
    fp = next(iter(cells.values()))["fp_top1"]
    assert rows[("FP32", "-")] == [f"{fp:.2f}", "-", f"{fp:.2f}", "-"]
    for r in (r for r in cells.values() if r["kind"] == "table"):
        c = rows[(r["bits"].upper(), r["method"])]
        i = 0 if r["source"] == "real" else 2
        assert c[i] == f"{r['top1']:.2f}" and c[i + 1] == A.fmt_time(r["time_s"])
    assert len(rows) == 1 + 2 * 2
    sweep = md.split("## Calibration-set size")[1]
    for r in (r for r in cells.values() if r["kind"] == "sweep"):
        line = next(x for x in sweep.splitlines() if x.startswith(f"| W4A4 | {r['method']} |"))
        vals = [x.strip() for x in line.strip("|").split("|")][2:]
        assert vals[[8, 16].index(r["calib_size"])] == f"{r['top1']:.2f}"
    assert "--iters 2" in md and "torch" in md
    png = (out / "calib_size.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # re-run: every cell is skipped (the JSON is unchanged), the outputs are regenerated
    before = (out / "accuracy.json").read_text()
    (out / "ACCURACY.md").unlink()
    calls = []
    monkeypatch.setattr(A, "run_cell", lambda *a: calls.append(a) or pytest.fail("finished cell re-run"))
    assert A.main(argv) == 0
    assert calls == [] and (out / "accuracy.json").read_text() == before and (out / "ACCURACY.md").exists()

    # a new cell with the same settings: only that one runs, the table keeps the others
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    ran, real = [], A.run_cell
    monkeypatch.setattr(A, "run_cell", lambda cell, *a: ran.append(cell.key) or real(cell, *a))
    over = {"--bits": "w4a4", "--methods": "e2e+ac"}
    argv2 = [over.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]
    assert A.main(argv2 + ["--sources", "real", "--no-sweep"]) == 0
    assert ran == ["table/w4a4/e2e+ac/real/16"]
    res2 = json.loads((out / "accuracy.json").read_text())
    assert len(res2["cells"]) == len(cells) + 1
    assert all(res2["cells"][k] == v for k, v in cells.items())
    ac = res2["cells"][ran[0]]["argv"]
    assert "--act-correction" in ac and ac[ac.index("--method") + 1] == "e2e"
    rows = _rows((out / "ACCURACY.md").read_text())
    assert rows[("W4A4", "e2e+ac")][0] == f"{res2['cells'][ran[0]]['top1']:.2f}"
    assert rows[("W4A4", "e2e+ac")][2:] == ["-", "-"] and len(rows) == 1 + 2 * 2 + 1


def test_settings_mismatch_and_render_only(cifar_small, tmp_path, capsys):
    out = tmp_path / "b"
    with pytest.raises(SystemExit, match="does not exist"):
        A.main(["--out", str(out), "--render-only"])
    out.mkdir()
    A.save_results(str(out / "accuracy.json"), {"settings": {"iters": 5}, "cells": {}})
    with pytest.raises(SystemExit, match="other settings"):
        A.main(["--data", str(cifar_small), "--out", str(out), "--iters", "2"])
    with pytest.raises(SystemExit, match="train/ and test/"):
        A.main(["--data", str(tmp_path), "--out", str(out)])
    with pytest.raises(SystemExit):
        A.build_parser().parse_args(["--methods", "rtn,foo"])
    assert "unknown ['foo']" in capsys.readouterr().err


def test_parts_share_one_file(cifar_small, tmp_path, monkeypatch):
    """``--part table`` and ``--part sweep`` (as two processes would) fill one accuracy.json; a save never drops
    cells another process wrote meanwhile; the sweep's own --sweep-val-size means no twin reuse."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench"
    base = ["--data", str(cifar_small), "--out", str(out), "--bits", "w4a4", "--methods", "rtn", "--sources", "real",
            "--iters", "2", "--val-size", "20", "--sweep-val-size", "10", "--calib-size", "8", "--batch-size", "8",
            "--workers", "0", "--device", "cpu", "--sweep-bits", "w4a4", "--sweep-methods", "e2e", "--sizes", "8",
            "--no-progress"]
    assert A.main(base + ["--part", "sweep"]) == 0
    assert A.main(base + ["--part", "table"]) == 0
    cells = json.loads((out / "accuracy.json").read_text())["cells"]
    assert set(cells) == {"table/w4a4/rtn/real/8", "sweep/w4a4/e2e/real/8"}
    assert cells["sweep/w4a4/e2e/real/8"]["val_images"] == 10 and cells["table/w4a4/rtn/real/8"]["val_images"] == 20
    stale = {"settings": json.loads((out / "accuracy.json").read_text())["settings"], "cells": {"x": {"top1": 1}}}
    A.save_results(str(out / "accuracy.json"), stale)
    merged = json.loads((out / "accuracy.json").read_text())
    assert set(merged["cells"]) == set(cells) | {"x"}
    del merged["cells"]["x"]
    A._write_json(str(out / "accuracy.json"), merged)  # a save keeps what is on disk: drop x with a plain write
    md = (out / "ACCURACY.md").read_text()
    assert "on 10 cifar10/test images" in md and "table: top-1 on 20" in md
    assert A.main(["--out", str(out), "--render-only", "--note", "ran beside another job"]) == 0
    assert A.main(["--out", str(out), "--render-only", "--note", "ran beside another job"]) == 0
    assert json.loads((out / "accuracy.json").read_text())["notes"] == ["ran beside another job"]
    assert (out / "ACCURACY.md").read_text().count("- note: ran beside another job") == 1


def test_psaq_and_equal_time_cells(cifar_small, tmp_path, monkeypatch):
    """``e2e+psaq`` runs data-free only, on its own PSAQ-synthesized images; ``e2e+eqt`` gets ``--iters`` times the
    measured blockwise / e2e time ratio and a row in the equal-budget section."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench"
    argv = ["--data", str(cifar_small), "--out", str(out), "--bits", "w4a4", "--methods", "blockwise,e2e+psaq,e2e+eqt",
            "--iters", "2", "--val-size", "20", "--calib-size", "16", "--invert-steps", "2", "--batch-size", "8",
            "--workers", "0", "--device", "cpu", "--no-sweep", "--no-progress", "--forward", "fake"]
    assert A.main(argv) == 0
    res = json.loads((out / "accuracy.json").read_text())
    cells = res["cells"]
    assert all(r["argv"][r["argv"].index("--forward") + 1] == "fake" == r["forward"] for r in cells.values())
    assert set(cells) == {f"table/w4a4/{m}/{s}/16" for m in ("blockwise", "e2e+eqt") for s in ("real", "free")} | {
        "table/w4a4/e2e+psaq/free/16"}
    psaq = cells["table/w4a4/e2e+psaq/free/16"]["argv"]
    assert psaq[psaq.index("--synthesis") + 1] == "psaq" and psaq[psaq.index("--method") + 1] == "e2e"
    assert all("--synthesis" not in r["argv"] for k, r in cells.items() if "psaq" not in k)
    work = out / ".accuracy-work"
    assert sorted(os.listdir(work)) == ["invert-psaq-smooth-16-2-0", "invert-psaq-smooth-16-2-0.done",
                                        "invert-smooth-16-2-0", "invert-smooth-16-2-0.done"]
    assert set(res["invert_time_s"]) == {"smooth-16", "psaq-smooth-16"} and min(res["invert_time_s"].values()) > 0
    lowbit, psaq_dir = work / "invert-smooth-16-2-0", work / "invert-psaq-smooth-16-2-0"
    first = sorted(lowbit.rglob("*.png"))[0]
    assert first.read_bytes() != (psaq_dir / first.relative_to(lowbit)).read_bytes()
    for s in ("real", "free"):
        r = cells[f"table/w4a4/e2e+eqt/{s}/16"]
        b = r["budget"]
        assert b["ratio"] > 1 and b["iters"] == max(1, round(2 * b["ratio"])) == r["steps"]
        assert r["argv"][r["argv"].index("--iters") + 1] == str(b["iters"])
        assert len(b["probe_s"]["blockwise"]) == len(b["probe_s"]["e2e"]) == 3
    md = (out / "ACCURACY.md").read_text()
    assert _rows(md)[("W4A4", "e2e+psaq")][:2] == ["-", "-"]
    section = md.split("## Equal optimisation budget")[1].split("\n## ")[0]
    bw = cells["table/w4a4/blockwise/real/16"]
    eqt = cells["table/w4a4/e2e+eqt/real/16"]
    assert (f"| W4A4 | real | {bw['top1']:.2f} | - | {eqt['top1']:.2f} ({eqt['steps']}) | "
            f"{eqt['budget']['ratio']:.2f} |") in section
    assert "psaq loss, smooth prior, 16 images:" in md and "lowbit loss, smooth prior, 16 images:" in md
    assert "Figure 7" not in md


def test_data_free_size_sweep(cifar_small, tmp_path, monkeypatch):
    """``--sweep-sources free``: one synthesis per size, reused by every method; the Figure 7 table; the real-data
    sweep plot is not drawn from data-free cells."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench"
    argv = ["--data", str(cifar_small), "--out", str(out), "--part", "sweep", "--sweep-sources", "free",
            "--sweep-bits", "w4a4", "--sweep-methods", "rtn,e2e", "--sizes", "10,20", "--iters", "2",
            "--sweep-val-size", "20", "--invert-steps", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu",
            "--no-progress"]
    assert A.main(argv) == 0
    res = json.loads((out / "accuracy.json").read_text())
    assert set(res["cells"]) == {f"sweep/w4a4/{m}/free/{n}" for m in ("rtn", "e2e") for n in (10, 20)}
    assert sorted(os.listdir(out / ".accuracy-work")) == ["invert-smooth-10-2-0", "invert-smooth-10-2-0.done",
                                                          "invert-smooth-20-2-0", "invert-smooth-20-2-0.done"]
    assert set(res["invert_time_s"]) == {"smooth-10", "smooth-20"}
    for r in res["cells"].values():
        assert r["calib_images"] == r["calib_size"] and r["argv"][r["argv"].index("--data") + 1] == "invert"
    md = (out / "ACCURACY.md").read_text()
    fig7 = md.split("## Data-free calibration-set size (the paper's Figure 7)")[1].split("\n## ")[0]
    c = res["cells"]
    assert (f"| W4A4 | e2e | {c['sweep/w4a4/e2e/free/10']['top1']:.2f} | {c['sweep/w4a4/e2e/free/20']['top1']:.2f} |"
            in fig7)
    assert "| 10 synthetic | 20 synthetic |" in fig7
    assert "## Calibration-set size (real" not in md and not (out / "calib_size.png").exists()


def test_noise_prior_source_and_cells_from_before_the_prior(cifar_small, tmp_path, monkeypatch):
    """``--sources free-noise`` runs ``--invert-prior noise`` on the first recipe's cache folder; a data-free cell
    recorded before ``--invert-prior`` existed is listed as ``free-noise``, and a later save keeps the notes that
    are on disk."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench"
    argv = ["--data", str(cifar_small), "--out", str(out), "--bits", "w4a4", "--methods", "rtn", "--sources",
            "free-noise", "--iters", "2", "--val-size", "20", "--calib-size", "16", "--invert-steps", "2",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--no-sweep", "--no-progress"]
    assert A.main(argv) == 0
    res = A.load_results(str(out / "accuracy.json"))
    r = res["cells"]["table/w4a4/rtn/free-noise/16"]
    assert r["argv"][r["argv"].index("--invert-prior") + 1] == "noise"
    assert sorted(os.listdir(out / ".accuracy-work")) == ["invert-16-2-0", "invert-16-2-0.done"]
    old = {**r, "source": "free", "method": "e2e", "argv": [a for a in r["argv"] if a not in ("--invert-prior", "noise")]}
    raw = json.loads((out / "accuracy.json").read_text())
    raw["cells"]["table/w4a4/e2e/free/16"] = old
    A._write_json(str(out / "accuracy.json"), raw)
    A.add_notes(str(out), ["kept"])
    assert set(A.load_results(str(out / "accuracy.json"))["cells"]) == {"table/w4a4/rtn/free-noise/16",
                                                                         "table/w4a4/e2e/free-noise/16"}
    stale = A.load_results(str(out / "accuracy.json"))
    stale.pop("notes")
    A.save_results(str(out / "accuracy.json"), stale)
    assert A.load_results(str(out / "accuracy.json"))["notes"] == ["kept"]
    assert A.main(["--out", str(out), "--render-only"]) == 0
    rows = _rows((out / "ACCURACY.md").read_text())
    assert "data-free, noise prior (16) top-1" in (out / "ACCURACY.md").read_text()
    assert rows[("W4A4", "e2e")][0] == f"{old['top1']:.2f}"


def test_seed_section_pairs_like_with_like():
    """Each published method is paired with the package's variant on the same bits, source and forward (a cell
    without a recorded forward ran the fake one); no partner, no row."""
    def cell(bits, method, source, top1, forward=None):
        r = {"kind": "table", "bits": bits, "method": method, "source": source, "top1": top1}
        return r if forward is None else {**r, "forward": forward}
    table = [cell("w4a4", "e2e+sulq", "real", 76.47, "int"), cell("w4a4", "e2e+sulql", "real", 76.53, "int"),
             cell("w3a3", "e2e+sulq", "real", 73.31, "int"), cell("w3a3", "e2e+sulql", "real", 73.94, "fake"),
             cell("w4a4", "is-vit", "real", 76.56), cell("w4a4", "is-vit-quant", "real", 76.76),
             cell("w1.58a8", "e2e+psaq", "free", 65.00, "fake"), cell("w1.58a8", "e2e", "free", 66.43, "fake"),
             cell("w1.58a8", "e2e+intfwd", "free", 60.00, "int"),
             cell("w4a4", "e2e+psaq", "free-noise", 74.00, "int"), cell("w4a4", "e2e+intfwd", "free-noise", 73.49, "int"),
             cell("w4a4", "e2e", "free-noise", 73.24)]
    lines = A.seed_section(table)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| step")]
    assert rows == [
        "| SULQ softmax quantizer | W4A4 | real | int | e2e+sulq 76.47 | e2e+sulql 76.53 | +0.06 |",
        "| SOS stage training | W4A4 | real | fake | is-vit 76.56 | is-vit-quant 76.76 | +0.20 |",
        "| patch-similarity synthesis loss | W1.58A8 | free | fake | e2e+psaq 65.00 | e2e 66.43 | +1.43 |",
        "| patch-similarity synthesis loss | W4A4 | free-noise | int | e2e+psaq 74.00 | e2e+intfwd 73.49 | -0.51 |"]
    assert A.seed_section([cell("w4a4", "e2e+sulq", "real", 76.47, "int")]) == []


def test_combined_variants_compose():
    """``e2e+ac+eqt``: e2e with ``--act-correction`` (and its iterations) for the equal-budget step count."""
    args = A.build_parser().parse_args(["--data", "d", "--out", "o", "--correction-iters", "5"])
    argv = A.cell_argv(A.Cell("table", "w1.58a8", "e2e+ac+eqt", "free", 1024), args, "x", iters=77)
    assert argv[argv.index("--method") + 1] == "e2e" and "--act-correction" in argv
    assert argv[argv.index("--iters") + 1] == "77" and argv[argv.index("--correction-iters") + 1] == "5"
    assert A.variants_of("e2e+ac+eqt") == ["ac", "eqt"] and A.runs_on("e2e+ac+eqt", "real")


def test_invert_time_note_says_when_a_synthesis_was_not_timed():
    """A set made over interrupted runs that did not all record their time has no total (``None``)."""
    note = A._invert_time_note({"smooth-1024": 927.9, "smooth-10000": None})
    assert "lowbit loss, smooth prior, 10,000 images: time not recorded (made over interrupted runs)" in note
    assert "lowbit loss, smooth prior, 1,024 images: 928 s" in note
