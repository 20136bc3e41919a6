"""Shared by the equivalence suites: every evaluation order of a model against the float64 reference
(makemore.reference, through makemore.check.compare), row by row."""

import torch

from makemore.check import TOLERANCES, compare, prepare, random_data, table


def assert_orders_match_reference(
    model, N: int, T: int, dtype: torch.dtype, device: str, *, seed: int = 0, orders=None
) -> list:
    """Random sequences and right-padded targets; model moved away from init, logits at unit scale; every
    order in eval and training mode within the dtype's bounds of the reference (logits, loss, each
    parameter's gradient, BatchNorm's running buffers). Returns the rows."""
    model = model.to(device, dtype)
    S, Y = random_data(model.vocab_size, model.receptive_field, N, T, seed=seed, device=device)
    prepare(model, S, seed=seed)
    rows = compare(
        model,
        S,
        Y,
        dtype=dtype,
        tolerance=TOLERANCES["float64" if dtype == torch.float64 else "float32"],
        orders=orders,
    )
    assert all(r.passed for r in rows), "\n" + table(rows)
    return rows
