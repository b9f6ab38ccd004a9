import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import packing
from lowbit import primitives as P

BITS = [1.58, 2, 3, 4, 6, 8]


def _codes(gen, n, k, bits):
    return torch.randint(0, P.qmax(bits) + 1, (n, k), generator=gen, dtype=torch.int32).to(torch.uint8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [1, 3, 64, 65, 768, 770])
@pytest.mark.parametrize("n", [1, 7, 768])
def test_pack_unpack_identity(gen, bits, n, k):
    q = _codes(gen, n, k, bits)
    pw = packing.pack(q, bits)
    assert torch.equal(packing.unpack(pw), q)
    fmt = packing.FORMATS[pw.fmt]
    kp = packing.padded_k(k, pw.fmt)
    assert kp % fmt.k_multiple == 0 and kp - k < fmt.k_multiple
    bits_per_code = {"2bit": 2, "int4": 4, "int3": 3, "int8": 8}[pw.fmt]
    assert pw.nbytes() == n * kp * bits_per_code // 8


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(BITS), n=st.integers(1, 9), k=st.integers(1, 80), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_property(bits, n, k, seed):
    q = _codes(torch.Generator().manual_seed(seed), n, k, bits)
    assert torch.equal(packing.unpack(packing.pack(q, bits)), q)


def test_bit_layout_is_documented_one():
    """Pins the documented layouts: first code in the lowest bits."""
    q = torch.tensor([[1, 2, 0, 3, 2]], dtype=torch.uint8)
    pw = packing.pack(q, 2)
    assert pw.planes["lo"].tolist() == [[1 | 2 << 2 | 0 << 4 | 3 << 6, 2]]
    pw = packing.pack(torch.tensor([[3, 12, 7]], dtype=torch.uint8), 4)
    assert pw.planes["lo"].tolist() == [[3 | 12 << 4, 7]]
    q3 = torch.tensor([[5, 7, 0, 6, 1, 4, 3, 2, 7]], dtype=torch.uint8)
    pw = packing.pack(q3, 3)
    lo = [(c & 3) for c in q3[0].tolist()] + [0] * 7
    hi = [(c >> 2) for c in q3[0].tolist()] + [0] * 7
    assert pw.planes["lo"].tolist()[0] == [sum(lo[4 * j + i] << 2 * i for i in range(4)) for j in range(4)]
    assert pw.planes["hi"].tolist()[0] == [sum(hi[8 * j + i] << i for i in range(8)) for j in range(2)]
    pw = packing.pack(torch.tensor([[0, 255, 128]], dtype=torch.uint8), 8)
    assert pw.planes["q"].dtype == torch.int8 and pw.planes["q"].tolist() == [[-128, 127, 0]]


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="out of range"):
        packing.pack(torch.tensor([[3]], dtype=torch.uint8), 1.58)
    with pytest.raises(TypeError, match="integer"):
        packing.pack(torch.zeros(2, 2), 4)
    with pytest.raises(ValueError, match="2-D"):
        packing.pack(torch.zeros(2, dtype=torch.uint8), 4)
    pw = packing.pack(torch.zeros(2, 8, dtype=torch.uint8), 4)
    pw.planes["lo"] = pw.planes["lo"][:, :3]
    with pytest.raises(ValueError, match="must have shape"):
        packing.unpack(pw)
