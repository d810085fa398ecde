"""The products that take the RMSNorm in (batch-1 decode on CUDA; their reference paths here on the
CPU): the same results and residual sums as the norm followed by the product."""

import torch

from phivision.kernels.fused import add_rms_norm, rms_norm
from phivision.kernels.gemv import norm_linear
from phivision.kernels.paged_attention import qkv_rope_write_kv


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, 48, generator=gen)
    residual = torch.randn(1, 1, 48, generator=gen)
    norm_weight = 1 + 0.1 * torch.randn(48, generator=gen)
    return x, residual, norm_weight


def test_norm_linear_equals_the_norm_then_the_product():
    x, residual, norm_weight = _inputs()
    weight = torch.randn(20, 48, generator=torch.Generator().manual_seed(1))
    y, h = norm_linear(x, residual, norm_weight, 1e-5, weight)
    normed, expected_h = add_rms_norm(x, residual, norm_weight, 1e-5)
    assert torch.equal(h, expected_h) and torch.equal(h, x + residual)
    assert torch.equal(y, torch.nn.functional.linear(normed, weight))
    y0, h0 = norm_linear(x, None, norm_weight, 1e-5, weight)  # the first layer: no residual yet
    assert h0 is x and torch.equal(y0, torch.nn.functional.linear(rms_norm(x, norm_weight, 1e-5), weight))


def test_qkv_with_the_norm_equals_the_norm_then_the_qkv_kernel():
    x, residual, norm_weight = _inputs(2)
    heads, kv_heads, dim = 2, 2, 8  # hidden 48 = (2 + 2 * 2) * 8 outputs
    weight = torch.randn((heads + 2 * kv_heads) * dim, 48, generator=torch.Generator().manual_seed(3))
    cos, sin = torch.randn(dim), torch.randn(dim)
    pools = [torch.zeros(3, kv_heads, 4, dim) for _ in range(4)]
    slot = torch.tensor([5])
    got, h = qkv_rope_write_kv(x, weight, cos, sin, pools[0], pools[1], slot, heads, kv_heads, dim,
                               norm=(residual, norm_weight, 1e-5))
    normed, expected_h = add_rms_norm(x, residual, norm_weight, 1e-5)
    expected, none = qkv_rope_write_kv(normed, weight, cos, sin, pools[2], pools[3], slot, heads, kv_heads, dim)
    assert none is None
    assert torch.equal(got, expected) and torch.equal(h, expected_h)
    assert torch.equal(pools[0], pools[2]) and torch.equal(pools[1], pools[3]) and pools[0].abs().sum() > 0
