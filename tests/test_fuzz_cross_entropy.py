"""Fuzzed inputs for cross_entropy (kernels/loss.py), against F.cross_entropy in float64.

test_cross_entropy.py checks chosen cases and a property test over 2-D contiguous float32 logits;
this file draws the rest of the input space: 0 to 3 leading dimensions (some of size 0), V from 1
to 300, layouts that are not contiguous (transposed, sliced with a step, offset, expanded, and
two of these stacked), every floating dtype, both target dtypes and non-contiguous targets,
every reduction, ignore_index on none / some / all rows and equal to a real class, label
smoothing, extreme logits, and the in-place gradient. Loss and gradient must match; bad targets
and bad arguments must be one clear error.

As in test_cross_entropy.py, the Triton backend runs in a subprocess with TRITON_INTERPRET=1
(test_triton_fuzz_passes_under_the_interpreter), where each program is interpreted in Python:
its cases are few and small.
"""

import math
import re
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st
from interpreter import rerun_triton_cases

from makemore.kernels import cross_entropy
from makemore.kernels import loss as xent

tk = xent._triton  # the Triton kernels' module; None without triton
INTERPRET = tk is not None and tk.INTERPRET

CUDA_TRITON = tk is not None and torch.cuda.is_available() and not INTERPRET
TRITON_HERE = INTERPRET or CUDA_TRITON
DEVICE = "cuda" if CUDA_TRITON else "cpu"

# (rtol, atol) of the loss; the gradient's atol adds rtol x its largest entry (entries near 0 cancel).
TOLERANCE = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-4, 1e-5),
    # Loss and gradient are rounded to the logits' dtype once, ours and the reference alike: 1 ulp
    # (2^-11, 2^-8) apart at most, plus the expand's sum of a few half-precision gradients.
    torch.float16: (2e-2, 2e-3),
    torch.bfloat16: (3e-2, 4e-3),
}
LAYOUTS = ("transpose", "step", "offset", "expand")
EXTREMES = (1e4, -1e4, -float("inf"))


def _layout(shape: list[int], op: str, draw) -> tuple[list[int], object, str]:
    """(the shape of a tensor t, f such that f(t) has ``shape`` in the layout ``op`` makes, f as text)."""
    base = list(shape)
    # A dimension of size 1 leaves most layouts contiguous: prefer the others.
    wide = [d for d, n in enumerate(shape) if n > 1] or list(range(len(shape)))
    dim = draw(st.sampled_from(wide))
    if op == "transpose" and len(shape) >= 2:
        other = (dim + draw(st.integers(1, len(shape) - 1))) % len(shape)
        base[dim], base[other] = base[other], base[dim]
        return base, lambda t: t.transpose(dim, other), f"transpose({dim}, {other})"
    if op == "step":
        step = draw(st.integers(2, 3))
        base[dim] = shape[dim] * step
        index = (slice(None),) * dim + (slice(None, None, step),)
        return base, lambda t: t[index], f"every {step}th along dim {dim}"
    if op == "expand" and len(shape) >= 2:
        dim = draw(
            st.sampled_from([d for d in wide if d < len(shape) - 1] or list(range(len(shape) - 1)))
        )  # rows that share their logits
        base[dim] = 1
        return base, lambda t: t.expand(*shape), f"expand dim {dim}"
    base[dim] = shape[dim] + 1  # offset: the storage starts one element in (unaligned rows for Triton)
    return base, lambda t: t.narrow(dim, 1, shape[dim]), f"offset 1 along dim {dim}"


@st.composite
def cases(draw, *, max_rows: int, max_v: int = 300, inplace: bool = True, dtypes=tuple(TOLERANCE)):
    lead = draw(st.lists(st.integers(1, 5), max_size=3).filter(lambda dims: math.prod(dims) <= max_rows))
    if lead and draw(st.integers(0, 9)) == 3:  # one case in ten has no rows at all (3: hypothesis favours 0 and 9)
        lead[draw(st.integers(0, len(lead) - 1))] = 0
    v = draw(st.integers(1, max_v))
    inplace_grad = inplace and draw(st.booleans())
    shape, views, described = [*lead, v], [], []
    # Layouts stack: the first drawn is the outermost view. Expanded logits cannot take an in-place
    # gradient (test_inplace_grad_refuses_logits_that_share_memory).
    n_views = draw(st.sampled_from([0, 1, 2]))
    for op in draw(
        st.lists(
            st.sampled_from([op for op in LAYOUTS if not (inplace_grad and op == "expand")]),
            min_size=n_views,
            max_size=n_views,
        )
    ):
        shape, view, text = _layout(shape, op, draw)
        views.append(view)
        described.append(text)
    target_layout = draw(st.sampled_from(["contiguous", "strided", "transposed"]))
    return dict(
        lead=lead,
        v=v,
        layout=described,
        base_shape=shape,
        views=views[::-1],
        target_layout=target_layout,
        inplace_grad=inplace_grad,
        dtype=draw(st.sampled_from(dtypes)),
        target_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        ignore=draw(st.sampled_from(["none", "some", "all"])),
        ignore_index=draw(st.sampled_from([-100, -1, 0, v - 1, 2**31 - 1])),  # 0 and v - 1 are real classes
        scale=draw(st.sampled_from([0.1, 3.0, 30.0])),
        extremes=draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(EXTREMES)), max_size=3)),
        upstream=draw(st.sampled_from([1.0, -2.5, "random"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _targets(case, gen) -> torch.Tensor:
    lead, v = case["lead"], case["v"]
    target = torch.randint(0, v, lead, generator=gen)
    if case["ignore"] == "some":
        target[torch.rand(lead, generator=gen) < 0.3] = case["ignore_index"]
    elif case["ignore"] == "all":
        target.fill_(case["ignore_index"])
    target = target.to(case["target_dtype"])
    if case["target_layout"] == "strided":  # every other element of a wider buffer
        target = torch.stack([target, torch.full_like(target, 10**6)], dim=-1)[..., 0] if lead else target
    elif case["target_layout"] == "transposed" and len(lead) >= 2:
        target = target.transpose(0, 1).contiguous().transpose(0, 1)
    return target.to(DEVICE)


def check_case(case, backend: str) -> None:
    """Loss and d(upstream * loss)/d(logits) of ``case`` match F.cross_entropy's in float64."""
    gen = torch.Generator().manual_seed(case["seed"])
    base = torch.randn(case["base_shape"], generator=gen, dtype=torch.float64) * case["scale"]
    if base.numel():
        for index, value in case["extremes"]:
            base.view(-1)[index % base.numel()] = value
    base = base.to(DEVICE, case["dtype"])
    target = _targets(case, gen)
    kwargs = dict(
        reduction=case["reduction"], label_smoothing=case["label_smoothing"], ignore_index=case["ignore_index"]
    )

    def logits_of(x):
        for view in case["views"]:
            x = view(x)
        return x

    x = base.clone().requires_grad_()
    logits = logits_of(x * 1 if case["inplace_grad"] else x)  # in place: over a non-leaf, as a model's output
    assert list(logits.shape) == [*case["lead"], case["v"]]
    # Shown by pytest --hypothesis-show-statistics: how much of the space the examples cover.
    event("logits: " + ("empty" if not logits.numel() else "contiguous" if logits.is_contiguous() else "strided"))
    event(
        f"{str(case['dtype'])[6:]}, {case['reduction']}, ignore {case['ignore']}"
        + (", in place" if case["inplace_grad"] else "")
    )
    loss = cross_entropy(logits, target, backend=backend, inplace_grad=case["inplace_grad"], **kwargs)

    x_ref = base.double().requires_grad_()
    ref = F.cross_entropy(logits_of(x_ref).reshape(-1, case["v"]), target.reshape(-1).long(), **kwargs)
    if case["reduction"] == "none":
        ref = ref.reshape(target.shape)
    assert loss.dtype == case["dtype"] and loss.shape == ref.shape

    if case["upstream"] == "random":
        upstream = torch.rand(ref.shape, generator=gen, dtype=torch.float64).to(DEVICE) * 2 - 0.5
    else:
        upstream = torch.full(ref.shape, case["upstream"], dtype=torch.float64, device=DEVICE)
    (loss * upstream.to(loss.dtype)).sum().backward()
    (ref * upstream).sum().backward()

    rtol, atol = TOLERANCE[case["dtype"]]
    torch.testing.assert_close(loss.double(), ref.to(case["dtype"]).double(), rtol=rtol, atol=atol, equal_nan=True)
    expected = x_ref.grad.to(case["dtype"]).double()
    grad_atol = (
        atol + rtol * expected.nan_to_num(0.0, posinf=0.0, neginf=0.0).abs().max().item() if expected.numel() else atol
    )
    assert x.grad.dtype == case["dtype"]
    torch.testing.assert_close(x.grad.double(), expected, rtol=rtol, atol=grad_atol, equal_nan=True)


# The fallback is cheap: many examples. The Triton interpreter runs each program in Python: few,
# with at most 24 rows.
@settings(deadline=None, max_examples=300)
@given(case=cases(max_rows=120))
def test_fuzz_torch_matches_f_cross_entropy(case):
    check_case(case, "torch")


@pytest.mark.skipif(not TRITON_HERE, reason="runs in test_triton_fuzz_passes_under_the_interpreter")
@settings(deadline=None, max_examples=60)
@given(case=cases(max_rows=24))
def test_fuzz_triton_matches_f_cross_entropy(case):
    check_case(case, "triton")


@settings(deadline=None, max_examples=60)
@given(case=cases(max_rows=120, inplace=False, dtypes=(torch.float32, torch.float64)))
def test_fuzz_auto_hands_f_cross_entropy_the_rows(case):
    """At these sizes "auto" is F.cross_entropy behind a (..., V) -> (N, V) reshape: that reshape on
    its own, on every layout. (The loss values are F.cross_entropy's; the fused paths' are checked
    above, and the size at which "auto" switches in test_cross_entropy.py.)"""
    gen = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["base_shape"], generator=gen, dtype=case["dtype"]).to(DEVICE)
    for view in case["views"]:
        x = view(x)
    target = _targets(case, gen)
    calls = []

    def spy(rows, row_targets, **kwargs):
        calls.append((rows, row_targets, kwargs))
        return F.cross_entropy(rows, row_targets, **kwargs)

    kwargs = dict(
        reduction=case["reduction"], label_smoothing=case["label_smoothing"], ignore_index=case["ignore_index"]
    )
    with mock.patch.object(xent, "F", SimpleNamespace(cross_entropy=spy)):
        out = cross_entropy(x, target, backend="auto", **kwargs)
    assert len(calls) == 1, "auto did not take F.cross_entropy at this size"
    rows, row_targets, passed = calls[0]
    assert passed == kwargs
    assert rows.shape == (math.prod(case["lead"]), case["v"]) and torch.equal(rows, x.reshape(-1, case["v"]))
    assert row_targets.dtype == torch.int64 and torch.equal(row_targets, target.reshape(-1).long())
    expected = F.cross_entropy(rows, row_targets, **kwargs)
    expected = expected.view(target.shape) if case["reduction"] == "none" else expected
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


# --- bad input: one clear error, before any kernel reads the logits ---------------------------------

BAD_BACKENDS = ["torch", "auto"] + (["triton"] if TRITON_HERE else [])


@pytest.mark.parametrize("backend", BAD_BACKENDS)
@settings(deadline=None, max_examples=30)
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    v=st.integers(1, 300),
    bad=st.sampled_from(["negative", "too_large", "huge"]),
    target_dtype=st.sampled_from([torch.int64, torch.int32]),
    transposed=st.booleans(),
    data=st.data(),
)
def test_fuzz_out_of_range_target_names_its_position(backend, lead, v, bad, target_dtype, transposed, data):
    if DEVICE == "cuda":
        pytest.skip("on CUDA a bad target is a device-side assert (test_cross_entropy.py)")
    position = tuple(data.draw(st.integers(0, n - 1)) for n in lead)
    value = {
        "negative": data.draw(st.integers(-(2**31), -1).filter(lambda t: t != -100)),
        "too_large": data.draw(st.integers(v, v + 5)),
        "huge": 2**31 - 1,
    }[bad]
    gen = torch.Generator().manual_seed(len(lead) * 1000 + v)
    logits = torch.randn(*lead, v, generator=gen, requires_grad=True)
    target = torch.randint(0, v, lead, generator=gen)
    target[torch.rand(lead, generator=gen) < 0.3] = -100
    if transposed and len(lead) >= 2:  # the position is reported in the caller's indices, whatever the strides
        target = target.transpose(0, 1).contiguous().transpose(0, 1)
    target[position] = value
    target = target.to(target_dtype)
    expected = (
        rf"target\[{', '.join(map(str, position))}\] = {value} is out of range: "
        rf"class indices must be in \[0, {v}\) or equal ignore_index=-100"
    )
    with pytest.raises(ValueError, match=expected):
        cross_entropy(logits, target, backend=backend)
    assert logits.grad is None


@pytest.mark.parametrize("backend", BAD_BACKENDS)
@settings(deadline=None, max_examples=30)
@given(
    lead=st.lists(st.integers(0, 4), max_size=3),
    v=st.integers(1, 40),
    change=st.sampled_from(["target_shape", "target_dtype", "logits_dtype", "no_classes", "not_a_tensor"]),
    data=st.data(),
)
def test_fuzz_bad_arguments_are_one_clear_error(backend, lead, v, change, data):
    logits = torch.zeros(*lead, v, device=DEVICE)
    target = torch.zeros(lead, dtype=torch.long, device=DEVICE)
    if change == "target_shape":
        # One dimension more, one fewer, or one of another size: (N, C) logits with (N, C) targets
        # are F.cross_entropy's (N, C, d1) layout, the mistake classes-last guards against.
        shapes = [[*lead, v], lead[:-1], [*lead[:-1], (lead[-1] if lead else 0) + 1]]
        shape = data.draw(st.sampled_from([s for s in shapes if list(s) != list(lead)]))
        target, error, message = (
            torch.zeros(shape, dtype=torch.long, device=DEVICE),
            ValueError,
            r"target shape .* must equal the logits' shape without the class dimension",
        )
    elif change == "target_dtype":
        dtype = data.draw(
            st.sampled_from([torch.int8, torch.int16, torch.uint8, torch.bool, torch.float32, torch.float64])
        )
        target, error, message = target.to(dtype), ValueError, r"target must be int64 or int32 class indices"
    elif change == "logits_dtype":
        dtype = data.draw(st.sampled_from([torch.int64, torch.int32, torch.bool, torch.complex64]))
        logits, error, message = (
            logits.to(dtype),
            ValueError,
            r"logits must be a floating tensor of shape \(\.\.\., V\)",
        )
    elif change == "no_classes":
        logits, error, message = (
            torch.zeros(*lead, 0, device=DEVICE),
            ValueError,
            r"logits must have at least one class",
        )
        target.fill_(-100)  # all ignored: F.cross_entropy's nan, a 0 / 0 over no classes
    else:
        target, error, message = (
            target.tolist(),
            TypeError,
            r"logits and target must be tensors, got Tensor and (list|int)",
        )
    with pytest.raises(error, match=message):
        cross_entropy(logits, target, backend=backend)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if TRITON_HERE else []))
@pytest.mark.parametrize(
    "shape, expanded, refused",
    [
        ((1, 27), (4, 27), True),  # 4 rows, one memory location each column: in place would overwrite
        ((1, 5, 27), (3, 5, 27), False),  # reshape to (15, 27) copies: the copy takes the gradient
        ((2, 1, 27), (2, 4, 27), False),
    ],
)
def test_inplace_grad_refuses_logits_that_share_memory(backend, shape, expanded, refused):
    """Expanded rows are one memory location: in-place gradients would overwrite each other (Triton's did, silently)."""
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    logits = (x * 1).expand(expanded)
    target = torch.randint(0, 27, expanded[:-1], device=DEVICE)
    if refused:
        with pytest.raises(
            ValueError,
            match="inplace_grad=True writes the gradient over the logits, but some of their elements share memory",
        ):
            cross_entropy(logits, target, inplace_grad=True, backend=backend)
        return
    cross_entropy(logits, target, inplace_grad=True, backend=backend).backward()
    x_ref = x.detach().clone().requires_grad_()
    F.cross_entropy(x_ref.expand(expanded).reshape(-1, 27), target.reshape(-1)).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@settings(deadline=None, max_examples=200)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_shares_memory_against_a_count_of_offsets(shape, data):
    """Exact for what view ops make (transpose, slicing, expand); for any as_strided layout it may
    call a layout shared that is not, never the reverse."""
    t, exact = torch.empty(shape), True
    for _ in range(data.draw(st.integers(0, 3))):
        op = data.draw(st.sampled_from(["transpose", "step", "expand", "as_strided"]))
        dim = data.draw(st.integers(0, t.dim() - 1))
        if op == "transpose":
            t = t.transpose(dim, data.draw(st.integers(0, t.dim() - 1)))
        elif op == "step":
            t = t[(slice(None),) * dim + (slice(None, None, 2),)]
        elif op == "expand" and t.shape[dim] == 1:
            t = t.expand(*t.shape[:dim], data.draw(st.integers(1, 3)), *t.shape[dim + 1 :])
        elif op == "as_strided":
            t = torch.empty(1000).as_strided(t.shape, [data.draw(st.integers(0, 6)) for _ in t.shape])
            exact = False
    offsets = torch.zeros(t.shape, dtype=torch.long)
    for d, (n, stride) in enumerate(zip(t.shape, t.stride())):
        offsets = offsets + (torch.arange(n) * stride).view([n if i == d else 1 for i in range(t.dim())])
    shared = offsets.unique().numel() < offsets.numel()
    if exact:
        assert xent._shares_memory(t) == shared, (t.shape, t.stride())
    elif shared:
        assert xent._shares_memory(t), (t.shape, t.stride())


# --- the Triton cases in the interpreter ----------------------------------------------------------


@pytest.mark.skipif(tk is None, reason="triton is not installed")
@pytest.mark.skipif(TRITON_HERE, reason="the Triton cases run in this process")
def test_triton_fuzz_passes_under_the_interpreter():
    """Rerun this file's Triton cases in a process that imports Triton with TRITON_INTERPRET=1."""
    stdout = rerun_triton_cases(__file__, xent.BACKEND_ENV)
    passed = re.search(r"(\d+) passed", stdout)
    assert passed and int(passed[1]) >= 6, stdout[-3000:]
