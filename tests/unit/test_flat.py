"""Flat buffers: parameters and gradients are views that stay in sync through training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from psops_mpi.flat import FlatBuffers, FlatParams


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def concat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("set_to_none", [False, True])
def test_views_follow_optimizer_steps(opt_name: str, set_to_none: bool) -> None:
    model = small_net()
    before = concat(model.parameters()).clone()
    flat = FlatParams(model, extra=1)
    assert torch.equal(flat.data, before)  # binding keeps the values
    assert flat.packed.numel() == flat.numel + 1
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=0.01))
    for _ in range(3):
        opt.zero_grad(set_to_none=set_to_none)
        model(torch.randn(8, 5)).square().mean().backward()
        flat.attach_grads()
        assert torch.equal(flat.grad, concat(p.grad for p in model.parameters()))
        opt.step()
        assert torch.equal(flat.data, concat(model.parameters()))
    assert not torch.equal(flat.data, before)  # training really moved the buffer


def test_writing_the_buffer_changes_the_model() -> None:
    model = small_net()
    flat = FlatParams(model)
    flat.data.fill_(0.25)
    assert all(torch.all(p == 0.25) for p in model.parameters())
    out = model.eval()(torch.ones(2, 5))
    assert torch.allclose(out, out[0].expand_as(out))


def test_grads_stay_views_after_first_attach() -> None:
    model = small_net()
    flat = FlatParams(model)
    model(torch.randn(4, 5)).sum().backward()
    flat.attach_grads()
    ptrs = [p.grad.data_ptr() for p in model.parameters()]
    model(torch.randn(4, 5)).sum().backward()  # autograd accumulates into the views in place
    assert [p.grad.data_ptr() for p in model.parameters()] == ptrs


def test_float_buffers_are_flattened_and_follow_batchnorm() -> None:
    model = small_net()
    bufs = FlatBuffers(model)
    bn = model[1]
    assert bufs.data is not None and bufs.data.numel() == 14  # running mean + var of 7
    model.train()(torch.randn(16, 5) * 3 + 1)
    assert torch.equal(bufs.data, torch.cat([bn.running_mean, bn.running_var]))
    assert bn.num_batches_tracked.item() == 1  # integer buffers are left alone


def test_model_without_buffers_and_mixed_dtypes() -> None:
    assert FlatBuffers(nn.Linear(2, 2)).data is None
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="one dtype"):
        FlatParams(mixed)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        FlatParams(frozen)


def test_large_cpu_buffers_come_zeroed_in_the_right_dtype() -> None:
    from psops_mpi.flat import flat_buffer

    for numel in (10, 2_000_000):  # below and above the huge-page threshold
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            buf = flat_buffer(numel, dtype, "cpu")
            assert buf.shape == (numel,) and buf.dtype == dtype and not buf.any()
