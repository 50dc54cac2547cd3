import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from bitnest.errors import BitnestError
from bitnest.formats.packing import pack, packed_len, unpack


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), n=st.integers(1, 67), seed=st.integers(0, 2**31))
def test_unpack_pack_roundtrip(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 1 << bits, (rows, n), generator=g, dtype=torch.int32).to(torch.uint8)
    p = pack(c, bits)
    assert p.shape == (rows, packed_len(n, bits))
    assert torch.equal(unpack(p, bits, n), c)


@pytest.mark.parametrize("bits", range(1, 9))
def test_roundtrip_3d_and_device(bits, device):
    c = torch.randint(0, 1 << bits, (2, 3, 37), dtype=torch.int32).to(torch.uint8).to(device)
    assert torch.equal(unpack(pack(c, bits), bits, 37), c)


def test_golden_bytes():
    """Pins the layout: LSB-first bit stream, rows padded to whole bytes."""
    c = torch.tensor([[1, 2, 3, 0, 5]], dtype=torch.uint8)
    # 3 bits: 001 010 011 000 101 → stream (LSB first) 1,0,0, 0,1,0, 1,1,0, 0,0,0, 1,0,1 + pad
    assert pack(c, 3).tolist() == [[0b11010001, 0b01010000]]
    assert pack(torch.tensor([[0x1, 0xF, 0x7]], dtype=torch.uint8), 4).tolist() == [[0xF1, 0x07]]
    assert pack(torch.tensor([[3, 0, 1, 2, 3]], dtype=torch.uint8), 2).tolist() == [[0b10010011, 0b11]]
    assert pack(torch.tensor([[200, 7]], dtype=torch.uint8), 8).tolist() == [[200, 7]]


def test_one_bit_matches_numpy_little_packbits():
    c = torch.randint(0, 2, (4, 29), dtype=torch.uint8)
    ref = np.packbits(c.numpy(), axis=-1, bitorder="little")
    assert np.array_equal(pack(c, 1).numpy(), ref)


def test_rejects_bad_input():
    with pytest.raises(BitnestError):
        pack(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(BitnestError):
        pack(torch.tensor([[0]], dtype=torch.uint8), 9)
    with pytest.raises(BitnestError):
        unpack(torch.zeros(1, 3, dtype=torch.uint8), 4, 7)
