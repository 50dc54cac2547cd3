"""Packed codes on huge pages (bitnest/hugepages.py): same values, 2 MiB-aligned, backed by huge pages where the
kernel gives them, unmapped when the tensor dies; the loader and place_module use it, a switch's slices do not."""
import gc

import pytest
import torch
from safetensors.torch import save_file

from bitnest import hugepages as hp
from bitnest.formats.checkpoint import read_safetensors
from bitnest.formats.packing import pack, unpack
from bitnest.grids.nested import slice_codes
from bitnest.kernels import cpu, slice_pack

needs_thp = pytest.mark.skipif(not hp.supported(), reason="no transparent huge pages here (not Linux, or THP never)")


def _vma(addr: int) -> dict | None:
    """The /proc/self/smaps entry of the mapping that starts at addr (its fields in kB), or None."""
    cur = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                cur = {} if int(head.split("-")[0], 16) == addr else None
                if cur is not None:
                    found = cur
            elif cur is not None and line.split()[0].endswith(":"):
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    cur[parts[0][:-1]] = int(parts[1])
    return locals().get("found")


@needs_thp
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.float32])
def test_place_copies_values_onto_aligned_huge_pages(dtype):
    t = (torch.arange(3 << 20) % 251).to(dtype).reshape(768, -1)  # 3 Mi elements: ≥ 3 MiB
    p = hp.place(t)
    assert p is not t and torch.equal(p, t) and p.dtype == dtype and p.shape == t.shape and p.is_contiguous()
    assert hp.is_placed(p)
    vma = _vma(p.untyped_storage().data_ptr())
    assert vma is not None and vma["Size"] == -(-t.numel() * t.element_size() // 4096) * 4
    assert vma["AnonHugePages"] >= 2048  # at least the first 2 MiB on one huge page
    assert hp.place(p) is p  # already placed: no second copy


@needs_thp
def test_small_tensors_and_opt_out_stay(monkeypatch):
    small = torch.zeros(1 << 20, dtype=torch.uint8)  # 1 MiB < one huge page
    assert hp.place(small) is small
    big = torch.zeros(4 << 20, dtype=torch.uint8)
    monkeypatch.setenv("BITNEST_HUGEPAGES", "0")
    assert hp.place(big) is big and not hp.supported()
    e = hp.empty((4 << 20,), torch.uint8)
    assert e.shape == (4 << 20,) and _vma(e.untyped_storage().data_ptr()) is None  # torch's own allocation


@needs_thp
def test_mapping_is_released_with_the_tensor():
    p = hp.empty((4 << 20,), torch.uint8)
    addr = p.untyped_storage().data_ptr()
    assert hp.is_placed(p) and int(p.sum()) == 0  # zero-filled
    view = p[1:10]
    del p
    gc.collect()
    assert _vma(addr) is not None  # a view keeps it alive
    del view
    gc.collect()
    assert _vma(addr) is None


@needs_thp
def test_loader_slices_and_modules_are_placed(tmp_path):
    g = torch.Generator().manual_seed(0)
    q8 = torch.randint(0, 256, (1024, 4096), dtype=torch.uint8, generator=g)  # 4 MiB of 8-bit codes
    f = tmp_path / "m.safetensors"
    save_file({"q": q8, "s": torch.ones(1024, 1, dtype=torch.float16)}, str(f))
    st = read_safetensors(f)
    assert torch.equal(st["q"], q8) and hp.is_placed(st["q"]) and st["s"].dtype == torch.float16
    if cpu.available():  # a switch's working copy stays on ordinary pages: fresh huge pages fault in slowly here
        s4 = slice_pack(q8, 8, 4, 4096)
        assert _vma(s4.untyped_storage().data_ptr()) is None  # not a mapping of its own
        assert torch.equal(s4, pack(slice_codes(unpack(q8, 8, 4096), 8, 4), 4))
    m = torch.nn.Module()
    m.register_buffer("qweight", q8.clone())
    m.register_buffer("scale", torch.ones(1024 << 10))  # floats stay where they are
    scale = m.scale
    assert hp.place_module(m) == q8.numel() and hp.is_placed(m.qweight) and m.scale is scale
    assert torch.equal(m.qweight, q8)


@needs_thp
def test_place_module_drops_cached_views():
    from bitnest.grids.affine import AffineSpec
    from bitnest.nn.qlinear import QuantLinear
    q = QuantLinear.from_linear(torch.nn.Linear(2048, 1024, bias=False), AffineSpec(8, None, False))  # 2 MiB of codes
    x = torch.randn(2, 2048)
    y = q(x)
    assert "_view" in q.__dict__
    assert hp.place_module(q) == 2 << 20 and "_view" not in q.__dict__ and hp.is_placed(q.qweight)
    assert torch.equal(q(x), y) and q.packed.qweight is q.qweight
