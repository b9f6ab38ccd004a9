"""Rows of the bench table: one per timing; rate = operations per second / 1e12; ratio to the group's baseline."""
import json
import os
import tempfile
from pathlib import Path

ROWS = []
RESULTS = Path(__file__).with_name("bench_results.json")  # results.json is python -m bench.gpu's


def record(group: str, shape: str, impl: str, seconds: float, ops: float, unit: str = "TOPS",
           scale: float = 1e12) -> None:
    """One timing: ``ops`` operations (2 M N K for a GEMM) done in ``seconds`` (median); rate = ops / s / ``scale``."""
    ROWS.append(dict(group=group, shape=shape, impl=impl, ms=seconds * 1e3, rate=ops / seconds / scale, unit=unit))


def table(rows) -> str:
    base = {}
    for r in rows:
        if r["impl"].startswith("baseline"):
            base.setdefault((r["group"], r["shape"]), r["rate"])
    lines = [f"{'group':<12}{'shape':<26}{'impl':<22}{'ms':>9}{'rate':>10} {'unit':<8}{'x base':>8}"]
    for r in rows:
        b = base.get((r["group"], r["shape"]))
        ratio = f"{r['rate'] / b:8.2f}" if b else f"{'-':>8}"
        lines.append(f"{r['group']:<12}{r['shape']:<26}{r['impl']:<22}{r['ms']:9.4f}{r['rate']:10.3f} "
                     f"{r['unit']:<8}{ratio}")
    return "\n".join(lines)


def save(rows, meta) -> Path:
    """Atomic JSON write of ``{"meta": ..., "rows": ...}`` to ``bench/bench_results.json``."""
    fd, tmp = tempfile.mkstemp(dir=RESULTS.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    os.replace(tmp, RESULTS)
    return RESULTS
