"""Helpers shared by the equivalence suites: run one model in several evaluation orders and check
that they agree in logits, loss and every parameter's gradient."""

import torch

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}  # max abs diff of unit-scale logits
GRAD_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}  # max abs diff / max abs value, per parameter


def in_order(model, order: str, logits_of):
    """``logits_of`` run with the model in ``order``: the same parameters, another evaluation order."""

    def run():
        saved, model.order = model.order, order
        try:
            return logits_of()
        finally:
            model.order = saved

    return run


def cached_logits(model, S: torch.Tensor) -> torch.Tensor:
    """The first window by prefill, then one step per further token: (N, T, V)."""
    R = model.receptive_field
    logits, cache = model.prefill(S[:, :R])
    steps = [logits]
    for t in range(R, S.shape[1]):
        logits, cache = model.step(S[:, t], cache)
        steps.append(logits)
    return torch.stack(steps, 1)


def loss_and_grads(model, logits_of, Y):
    model.zero_grad(set_to_none=True)
    logits = logits_of().reshape(*Y.shape, -1)  # (N, T, V), in S's row-major order
    loss = model.loss(logits, Y)
    loss.backward()
    return logits.detach(), loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_paths_agree(model, paths: dict, reference: str, Y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Every path's logits, loss and gradients within the dtype's bounds of ``paths[reference]``'s; returns its logits."""
    paths = dict(paths)
    ref_logits, ref_loss, ref_grads = loss_and_grads(model, paths.pop(reference), Y)
    assert 0.5 < ref_logits.std() < 2  # unit scale: the absolute bounds mean what they say
    assert all(g.abs().max() > 0 for g in ref_grads.values())
    for name, logits_of in paths.items():
        logits, loss, grads = loss_and_grads(model, logits_of, Y)
        assert (logits - ref_logits).abs().max() <= TOL[dtype], name
        assert (loss - ref_loss).abs() <= TOL[dtype], name
        assert grads.keys() == ref_grads.keys()
        for p, g in grads.items():
            assert (g - ref_grads[p]).abs().max() <= GRAD_RTOL[dtype] * ref_grads[p].abs().max(), (name, p)
    return ref_logits
