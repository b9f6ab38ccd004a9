"""``bench.host_overhead`` on a tiny ViT: it runs, counts launches per forward and writes its JSON."""
import json

from bench import host_overhead


def test_tiny_model_launch_counts(tmp_path):
    out = tmp_path / "host.json"
    assert host_overhead.main(["--model", "tiny", "--iters", "1", "--repeats", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    depth = host_overhead.TINY[1]["depth"]
    assert r["launches"]["quant_attention_one_pass_kernel"] == depth  # a short sequence: one pass over the keys
    assert "quant_attention_kernel" not in r["launches"]
    assert r["launches"]["layernorm_quantize_kernel"] == 2 * depth
    # only the patch embedding's and the head's inputs are quantized on their own: Q, K, V come out of the qkv GEMM
    # and proj's input out of the attention (separately, 4 more quantize kernels per block)
    assert r["launches"]["rescale_quantize_kernel"] == 2
    assert r["launches_total"] == sum(r["launches"].values()) and r["host_ms_median"] > 0
