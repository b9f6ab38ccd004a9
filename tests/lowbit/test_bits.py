import pytest

from lowbit.bits import BitConfig, parse_bits


@pytest.mark.parametrize("spec,w,a", [("w1.58a8", 1.58, 8), ("w3a3", 3, 3), ("w4a4", 4, 4), ("w6a6", 6, 6),
                                      ("w8a8", 8, 8), ("w4a8", 4, 8), ("W2A16", 2, 16), ("w4-a4", 4, 4)])
def test_parse_accepted(spec, w, a):
    cfg = parse_bits(spec)
    assert (cfg.w_bits, cfg.a_bits) == (w, a)
    assert cfg.ternary == (w == 1.58)
    assert parse_bits(cfg.name) == cfg


@pytest.mark.parametrize("spec", ["w5a4", "w4a5", "w1.5a8", "a4w4", "w4", "4a4", "", "w1.58a2", "w16a16", "wXa4"])
def test_parse_rejects_with_accepted_forms(spec):
    with pytest.raises(ValueError, match="accepted forms"):
        parse_bits(spec)


def test_parse_rejects_non_string():
    with pytest.raises(ValueError, match="accepted forms"):
        parse_bits(44)
    with pytest.raises(ValueError, match="accepted forms"):
        BitConfig(5, 4)
