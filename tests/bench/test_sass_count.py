"""``python -m bench.sass_count`` on CPU (compiled for sm_90 in a subprocess without the interpreter): the
element-wise quantize kernels keep IEEE division out of their per-element path."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quantize_kernels_have_no_per_element_division(tmp_path):
    path = tmp_path / "sass.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-m", "bench.sass_count", "--json", str(path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| layernorm_quantize a4" in r.stdout
    rows = {row["kernel"]: row for row in json.loads(path.read_text())}
    for name in ("rescale_quantize a4", "layernorm_quantize a4 (deployed: folded affine)"):
        row = rows[name]
        # one out-of-line slow-path call per reciprocal (1 / s, 1 / std) and sqrt; a per-element div_rn would add
        # one per element a thread holds (16 here)
        assert row["call"] <= 3, row
        assert 0 < row["per_element"] < 35, row


def test_refuses_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "bench.sass_count"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: TRITON_INTERPRET=1")
