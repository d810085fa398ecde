"""kernels/flash4.py without a GPU: the lazy import of flash-attn-4, the support rule, and the views
a prompt's attention hands to FA4."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from phivision.kernels import flash4


@pytest.fixture
def fresh(monkeypatch):
    """The module as just imported: FA4 not looked for yet."""
    monkeypatch.setattr(flash4, "_flash_attn_func", None)
    monkeypatch.setattr(flash4, "_import_tried", False)
    return flash4


def test_a_missing_package_reads_as_not_installed_and_attention_says_so(fresh, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # `import flash_attn.cute` raises ImportError
    assert not fresh.installed()
    assert fresh._import_tried
    with pytest.raises(RuntimeError, match=r"pip install 'phivision\[flash4\]'"):
        fresh.attention(*(torch.zeros(1, 4, 2, 8) for _ in range(3)), causal=True)


def test_the_package_is_imported_once_at_first_use(fresh, monkeypatch):
    lookups = []

    class Cute(types.ModuleType):  # stands in for the flash_attn.cute module; counts `from ... import`
        def __getattr__(self, name):
            if name.startswith("__"):  # the import system's own probes (__path__ ...)
                raise AttributeError(name)
            lookups.append(name)
            return lambda q, k, v, causal: (q + 0, None)

    monkeypatch.setitem(sys.modules, "flash_attn.cute", Cute("flash_attn.cute"))
    assert fresh.installed() and fresh.installed()
    assert lookups == ["flash_attn_func"]
    q = torch.randn(1, 4, 2, 8)
    assert torch.equal(fresh.attention(q, q, q, causal=False), q)  # the (out, lse) tuple unpacked
    assert lookups == ["flash_attn_func"]


def test_support_needs_a_half_precision_cuda_tensor_and_a_head_size_fa4_takes(fresh, monkeypatch):
    monkeypatch.setattr(fresh, "_flash_attn_func", lambda *args, **kwargs: None)
    assert not fresh.supported(torch.device("cpu"), torch.bfloat16, 96)
    assert not fresh.supported(torch.device("cuda"), torch.float32, 96)
    assert not fresh.supported(torch.device("cuda"), torch.bfloat16, 100)  # not a multiple of 8
    assert not fresh.supported(torch.device("cuda"), torch.bfloat16, 512)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fresh.supported(torch.device("cuda"), torch.bfloat16, 96)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not fresh.supported(torch.device("cuda"), torch.float16, 96)


def test_causal_self_attention_hands_fa4_views_of_the_projection_rows(fresh, monkeypatch):
    """Grouped heads: 4 query heads, 2 key/value heads of 8. FA4 gets (1, T, H, D) views of the
    (T, (H + 2*H_kv) * D) rows without copies, and its (1, T, H, D) output comes back as (T, H * D)."""
    seen = {}

    def stand_in(q, k, v, causal):
        seen.update(q=q, k=k, v=v, causal=causal)
        return q * 2, None

    monkeypatch.setattr(fresh, "_flash_attn_func", stand_in)
    qkv = torch.randn(5, (4 + 2 * 2) * 8)
    out = fresh.causal_self_attention(qkv, 4, 2, 8)
    assert seen["causal"] and seen["q"].shape == (1, 5, 4, 8) and seen["k"].shape == seen["v"].shape == (1, 5, 2, 8)
    assert all(t.data_ptr() >= qkv.data_ptr() and t.stride(1) == qkv.shape[1] for t in seen.values() if torch.is_tensor(t))
    assert torch.equal(seen["k"].reshape(5, 16), qkv[:, 32:48]) and torch.equal(seen["v"].reshape(5, 16), qkv[:, 48:])
    assert out.shape == (5, 32) and torch.equal(out, qkv[:, :32] * 2)
