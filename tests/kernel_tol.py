"""Tolerances for comparing a fast kernel path with the pure-torch reference.

The fast paths compute the same products in another order (fp32 accumulation in a different association, the
codes offset by 2^b and the offset removed per group), so they agree with the reference to a few units of
fp32 rounding relative to the output's scale, not bit for bit. bf16/fp16 activations: the reference itself
rounds the weight to the activation dtype, so the tolerance is that dtype's."""
import torch

RTOL = {torch.float32: 3e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-4, torch.float16: 1e-5}  # for outputs that are ~0 everywhere


def assert_close(fast: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = torch.float32, what: str = "",
                 scale: float | None = None) -> None:
    """max |fast − ref| ≤ rtol(dtype) · scale + atol(dtype), scale = max |ref| by default (norm-wise: elementwise is
    meaningless near zero), or the dot products' condition max_i Σ_j |ŵ_ij x_j| (`condition`) when outputs can
    cancel to almost nothing."""
    fast, ref = fast.float(), ref.float()
    assert fast.shape == ref.shape, (fast.shape, ref.shape)
    scale = max(ref.abs().max().item(), scale or 0.0) + 1e-12
    err = (fast - ref).abs().max().item()
    assert err <= RTOL[dtype] * scale + ATOL[dtype], f"{what}: max error {err:.3g} > {RTOL[dtype]} × {scale:.3g}"


def condition(x: torch.Tensor, W: torch.Tensor) -> float:
    """max over outputs of Σ_j |ŵ_ij x_j|: the size of the terms a dot product sums."""
    return (x.float().abs().reshape(-1, x.shape[-1]) @ W.float().abs().T).max().item()
