"""bfloat16 end to end (``--dtype bfloat16``: torch.autocast with float32 master weights).

Under autocast every matmul of both WaveNets runs in bfloat16 (forward and backward, the gated
layer's hand-written backward included), while the long sums stay float32: BatchNorm's
statistics and count, the gated model's residual stream and skip sum, the loss. Checked against
the same model in float32, within bounds set from bfloat16's 8-bit significand: unit-scale
logits within LOGITS_TOL, the loss within LOSS_TOL, and each parameter's gradient within
GRAD_RTOL of its largest entry (measured: about a third of each bound or less).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from makemore.data import IGNORE_INDEX
from makemore.models import GATED_ORDERS, ORDERS, GatedLayer, GatedWaveNet, GatedWaveNetConfig, WaveNet, WaveNetConfig
from makemore.nn import BatchNorm1d, batch_norm_tanh

LOGITS_TOL = 0.06  # max abs difference of unit-scale logits
LOSS_TOL = 0.01
# ||grad_bf16 - grad_f32|| / ||grad_f32||, per parameter. The gated model's bound is wider: its
# gradients at init are sums over the outputs that largely cancel (and ReLUs in its head flip
# where bfloat16 moves a value across 0), so their relative error is many times the 2^-9 of one
# rounding, in float32-vs-float32 of the same model with rounded GEMM operands too. Its layer's
# hand-written backward is checked tightly against autograd in bfloat16 below.
GRAD_RTOL = {"wavenet": 0.04, "gated": 0.2}  # measured: at most 0.013 and 0.09

MATMULS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.convolution.default,
    torch.ops.aten.addmm_.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten.convolution_backward.default,
}


class MatmulDtypes(TorchDispatchMode):
    """Records the dtype of every matmul's floating-point operands (the ops autocast and the models call).

    GEMVs are left out: the fused BatchNorm's masked statistics are sums weighted by a column of
    0/1 weights (``weights.T @ x``), in float32 on purpose."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operands = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
        if func in MATMULS and not any(1 in a.shape for a in operands):
            for a in args:
                if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() >= 2:
                    self.seen.append((str(func), a.dtype))
        return func(*args, **(kwargs or {}))


def wavenet(order, fused):
    return WaveNet(WaveNetConfig(27, 16, 12, 32, order=order, fused=fused))


def gated(order):
    return GatedWaveNet(GatedWaveNetConfig(27, 16, 16, 24, n_levels=4, stacks=2, order=order))


CASES = {f"wavenet-{o}{'-fused' if f else ''}": (lambda o=o, f=f: wavenet(o, f)) for o in ORDERS for f in (False, True)}
CASES |= {f"gated-{o}": (lambda o=o: gated(o)) for o in GATED_ORDERS}


def data(model):
    """Sequences with right padding in the targets (BatchNorm's masked statistics)."""
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 27, (4, model.receptive_field + 23), generator=gen)
    targets = torch.randint(0, 27, (4, 24), generator=gen)
    targets[1, -7:] = IGNORE_INDEX
    return idx, targets


def run(model, idx, targets, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        logits, loss = model(idx, targets)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", CASES)
def test_bfloat16_is_float32_within_bounds(name):
    torch.manual_seed(0)
    model = CASES[name]()
    idx, targets = data(model)
    with torch.no_grad():  # unit-scale logits, so that the absolute bounds mean what they say
        model.lm_head.weight /= model(idx)[0].std()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    logits32, loss32, grads32 = run(model, idx, targets, autocast=False)
    buffers32 = {n: b.clone() for n, b in model.named_buffers()}
    model.load_state_dict(state)  # the same BatchNorm running statistics before each run
    with MatmulDtypes() as matmuls:
        logits16, loss16, grads16 = run(model, idx, targets, autocast=True)

    assert matmuls.seen and all(dtype == torch.bfloat16 for _, dtype in matmuls.seen), set(matmuls.seen)
    assert logits16.dtype == loss16.dtype == torch.float32  # the head's bias add and the loss in float32
    assert (logits16 - logits32).abs().max() <= LOGITS_TOL
    assert (loss16 - loss32).abs() <= LOSS_TOL
    for n, g in grads16.items():
        assert g.dtype == torch.float32, n  # gradients reach the float32 master weights
        assert (g - grads32[n]).norm() <= GRAD_RTOL[name.split("-")[0]] * grads32[n].norm(), n
    for n, buffer in model.named_buffers():  # BatchNorm's running statistics: float32, and near float32's
        assert buffer.dtype == torch.float32, n
        assert (buffer - buffers32[n]).abs().max() <= 0.01 * buffers32[n].abs().max(), n


@pytest.mark.parametrize("last", [False, True], ids=["residual", "last"])
def test_the_gated_layers_backward_in_bfloat16_is_autograds(last):
    """The hand-written Function under autocast against autograd through the same ops (``gate``,
    ``residual`` on the two row slices): the same bfloat16 GEMMs, so only the order of the float32
    and bfloat16 sums differs."""
    torch.manual_seed(0)
    layer = GatedLayer(16, 12, 20, dilation=3, n_layers=4, last=last)
    x = torch.randn(64, 16, requires_grad=True)
    dz, dx_next = torch.randn(61, 12), torch.randn(61, 16)

    def grads(forward):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", torch.bfloat16):
            z, x_next = forward()
        assert z.dtype == torch.bfloat16 and (last or x_next.dtype == torch.float32)
        ((z.float() * dz).sum() + (0 if last else (x_next * dx_next).sum())).backward()
        return [x.grad, layer.conv.weight.grad, layer.conv.bias.grad] + ([] if last else [layer.res.weight.grad])

    def composed():
        z = layer.gate(x[:-3], x[3:])
        return z, None if last else layer.residual(x[3:], z)

    for ours, theirs in zip(grads(lambda: layer.dilated(x)), grads(composed), strict=True):
        assert ours.dtype == torch.float32
        assert (ours - theirs).norm() <= 1e-2 * theirs.norm()


@pytest.mark.parametrize("order", GATED_ORDERS)
def test_gated_sums_over_layers_stay_float32(order):
    """The skip sum and the residual stream add a bfloat16 GEMM per layer to a float32 accumulator:
    one bfloat16 step anywhere would leave the sum bfloat16 (bf16 + bf16 stays bf16)."""
    torch.manual_seed(0)
    model = gated(order)
    idx, _ = data(model)
    seen = []
    N, L = idx.shape
    with torch.autocast("cpu", torch.bfloat16):
        x = model.wte(idx).reshape(N * L, -1)
        for layer in model.layers[:2]:
            z, x_next = layer.dilated(x)
            seen.append((z.dtype, x_next.dtype))
            x = x_next
        skip = model._walk(model.wte(idx).reshape(N * L, -1), N, L, per_window=False)
    assert seen == [(torch.bfloat16, torch.float32)] * 2
    assert skip.dtype == torch.float32


@pytest.mark.parametrize("fused", [False, True])
def test_masked_batch_norm_counts_and_sums_in_float32_under_autocast(fused):
    """2697 valid rows of 2704: a bfloat16 count would be 2688 or 2704 (8-bit significand)."""
    torch.manual_seed(0)
    x = (torch.randn(2704, 16) * 3 + 5).to(torch.bfloat16)
    mask = torch.ones(2704, dtype=torch.bool)
    mask[torch.randperm(2704)[:7]] = False
    bn16, bn32 = BatchNorm1d(16), BatchNorm1d(16)
    with torch.autocast("cpu", torch.bfloat16):
        out16 = batch_norm_tanh(x, bn16, mask) if fused else torch.tanh(bn16(x, mask))
    out32 = torch.tanh(bn32(x.float(), mask))  # the same bfloat16 inputs, in float32 outside autocast
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, out32, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn16.running_mean, bn32.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn16.running_var, bn32.running_var, rtol=1e-6, atol=1e-6)
