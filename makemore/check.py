"""``python -m makemore.check``: every evaluation order of a WaveNet against the float64 reference, on this machine.

    python -m makemore.check --model gated --n-levels 10 --device cuda --dtype float32

builds the model the flags describe (the training flags of its config), moves its parameters
away from their initial values, scales its head so the logits have unit spread (absolute bounds
then mean what they say) and draws random sequences, targets right-padded with -100 as the data
pipeline pads them. It then runs every order (per position or per window one at a time, batched
windows, the convolutions, cached prefill/step) in eval mode and, where the order trains, in
training mode, and compares each with ``makemore.reference`` (float64, autograd): max |Δ logits|,
|Δ loss|, the worst relative Δ of a parameter's gradient (max |Δ| / max |reference|), and in
training mode the BatchNorm running buffers. It prints one row per order and mode with the
tolerance for the dtype and math mode, says whether TF32 was on (CUDA), and exits 1 if any row
fails. ``--dtype bfloat16`` runs the model under autocast with float32 weights, as training does.
Dropout is random by design, so the check builds the model without it.
"""

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from . import reference
from .data import IGNORE_INDEX
from .device import autocast, check_device, resolve_device
from .models import MODELS as MODEL_CLASSES
from .models import build_model
from .nn import FlattenConsecutive
from .train.config import TrainConfig, make_configs, model_fields, model_help

MODELS = ("wavenet", "gated")
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
NOT_CHECKED = ("order", "dropout")  # the check runs every order, and compares deterministic functions


def _model_flags() -> list[str]:
    """The training flags of the checked models' configs, but those the check sets itself."""
    own = {f.name for m in MODELS for f in fields(MODEL_CLASSES[m][1])}
    return [name for name in model_fields() if name in own and name not in NOT_CHECKED]


@dataclass(frozen=True)
class Tolerance:
    logits: float  # max |Δ logits| at unit-scale logits
    loss: float  # |Δ loss|
    grad: float  # per parameter, max |Δ grad| / max |reference grad|


# Bounds with a margin over the worst cases seen (docs/equivalence.md). "tf32": float32 matmuls or
# convolutions in TensorFloat-32 (10-bit mantissa) on CUDA. bfloat16's gradient bound is loose: an
# input of a ReLU or tanh near 0 changes side under bf16 rounding, so single entries of a gradient
# summed over the check's few outputs move by tens of percent; it still catches a wrong or missing term.
TOLERANCES = {
    "float64": Tolerance(1e-10, 1e-10, 1e-9),
    "float32": Tolerance(1e-4, 1e-5, 1e-4),
    "tf32": Tolerance(2e-2, 5e-3, 5e-2),
    "bfloat16": Tolerance(2e-1, 5e-2, 6e-1),
}


@dataclass
class Row:
    order: str
    mode: str  # eval or train
    logits: float
    loss: float
    grad: float
    buffers: float | None  # training mode, BatchNorm: max |Δ running buffer|
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        t = self.tolerance
        buffers_ok = self.buffers is None or self.buffers <= t.logits  # running buffers: the logits bound
        return self.logits <= t.logits and self.loss <= t.loss and self.grad <= t.grad and buffers_ok


def math_mode(dtype: torch.dtype, device: torch.device) -> str:
    """The tolerance's key: the dtype, or "tf32" where CUDA rounds float32 products to TensorFloat-32."""
    if dtype == torch.float32 and device.type == "cuda" and tf32_on():
        return "tf32"
    return {torch.float64: "float64", torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]


def tf32_on() -> bool:
    return torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32


# The orders. Each returns (logits (N, T, V), loss) for sequences S (N, L) and targets Y (N, T).


def windows_of(S: torch.Tensor, R: int) -> torch.Tensor:
    return S.unfold(1, R, 1).reshape(-1, R)  # (N·T, R): row n·T + j is S[n, j : j + R]


def _in_order(model, order: str, S, Y):
    saved, model.order = model.order, order
    try:
        return model(S, Y)
    finally:
        model.order = saved


def _window_batch(model, S, Y):
    """Every output's window as one row of a batch (T = 1 per row), in the windows order."""
    N, T = Y.shape
    saved, model.order = model.order, "windows"
    try:
        logits, loss = model(windows_of(S, model.receptive_field), Y.reshape(-1, 1))
    finally:
        model.order = saved
    return logits.view(N, T, -1), loss


def _lecture_loop(model, S, Y):
    """The lecture's forward, one position at a time: a Python loop that slides the context one token
    along and runs the model's layers in the notebook's Sequential order (Embedding, then per level
    FlattenConsecutive(2), Linear, BatchNorm, Tanh; the head), not the model's walk."""
    flatten = FlattenConsecutive(2)
    B = model.block_size
    rows = []
    for n in range(S.shape[0]):
        context = S[n, :B].tolist()
        out = []
        for t in range(B, S.shape[1] + 1):
            x = model.wte(torch.tensor([context], device=S.device))  # (1, B, C)
            for block in model.blocks:
                x = torch.tanh(block.bn(block.linear(flatten(x))))
            out.append(model.lm_head(x)[0])  # (V,)
            if t < S.shape[1]:
                context = context[1:] + [int(S[n, t])]
        rows.append(torch.stack(out))
    logits = torch.stack(rows)
    return logits, model.loss(logits, Y)


def _window_loop(model, S, Y):
    """One output's window at a time, a Python loop over positions, in the windows order."""
    R = model.receptive_field
    saved, model.order = model.order, "windows"
    try:
        logits = torch.stack(
            [
                torch.cat([model(S[n : n + 1, t : t + R])[0][0] for t in range(S.shape[1] - R + 1)])
                for n in range(S.shape[0])
            ]
        )
    finally:
        model.order = saved
    return logits, model.loss(logits, Y)


def cached_logits(model, S: torch.Tensor) -> torch.Tensor:
    """The first window by prefill, then one step per further token: (N, T, V)."""
    R = model.receptive_field
    logits, cache = model.prefill(S[:, :R])
    steps = [logits]
    for t in range(R, S.shape[1]):
        logits, cache = model.step(S[:, t], cache)
        steps.append(logits)
    return torch.stack(steps, 1)


def _cached(model, S, Y):
    logits = cached_logits(model, S)
    return logits, model.loss(logits, Y)


@dataclass(frozen=True)
class Order:
    name: str
    run: Callable  # (model, S, Y) -> (logits (N, T, V), loss)
    train: bool  # also compared in training mode
    population: str  # the order whose training statistics it keeps (reference.once_per_node_levels)
    window_batch: bool = False  # a batch of single windows: T = 1 per row


WAVENET_ORDERS = [
    Order("per position (lecture loop)", _lecture_loop, False, "windows"),
    Order("windows (window batch)", _window_batch, True, "windows", window_batch=True),
    Order("windows", lambda m, S, Y: _in_order(m, "windows", S, Y), True, "windows"),
    Order("conv1d", lambda m, S, Y: _in_order(m, "conv1d", S, Y), True, "conv"),
    Order("conv", lambda m, S, Y: _in_order(m, "conv", S, Y), True, "conv"),
    Order("cached steps", _cached, False, "conv"),
]
GATED_ORDERS = [
    Order("per window (loop)", _window_loop, True, "windows"),
    Order("windows (window batch)", _window_batch, True, "windows", window_batch=True),
    Order("windows", lambda m, S, Y: _in_order(m, "windows", S, Y), True, "windows"),
    Order("conv", lambda m, S, Y: _in_order(m, "conv", S, Y), True, "conv"),
    Order("cached steps", _cached, False, "conv"),
]


def orders_of(model) -> list[Order]:
    return WAVENET_ORDERS if hasattr(model, "blocks") else GATED_ORDERS


def reference_of(
    model, S: torch.Tensor, Y: torch.Tensor, *, training: bool, population: str, window_batch: bool
) -> reference.Result:
    """The reference's logits (N, T, V), loss, gradients and buffers for this order's inputs and population."""
    state = dict(model.state_dict())
    N, T = Y.shape
    idx, targets = (windows_of(S, model.receptive_field), Y.reshape(-1, 1)) if window_batch else (S, Y)
    if hasattr(model, "blocks"):
        n = len(model.blocks)
        once = reference.once_per_node_levels(population, targets.shape[1], n)
        result = reference.tree(state, idx, targets, training=training, once_per_node=once)
    else:
        result = reference.gated(state, idx, targets, n_levels=model.config.n_levels)
    result.logits = result.logits.reshape(N, T, -1)
    return result


def compare(
    model, S: torch.Tensor, Y: torch.Tensor, *, dtype: torch.dtype, tolerance: Tolerance | None = None, orders=None
) -> list[Row]:
    """Every order of ``model`` against the reference, eval mode then training mode; the model ends in eval mode,
    unchanged.

    ``dtype``: float64 and float32 run the model in that dtype; bfloat16 runs it under autocast.
    """
    device = S.device
    tolerance = tolerance or TOLERANCES[math_mode(dtype, device)]
    mixed = autocast(device, dtype)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    rows, references = [], {}
    for training in (False, True):
        model.train(training)
        for order in orders or orders_of(model):
            if training and not order.train:
                continue
            # Only BatchNorm's statistics depend on the mode and the order's population; else one reference serves all.
            key = (order.population, order.window_batch) if training and hasattr(model, "blocks") else None
            if key not in references:
                references[key] = reference_of(
                    model, S, Y, training=training, population=order.population, window_batch=order.window_batch
                )
            ref = references[key]
            model.zero_grad(set_to_none=True)
            with mixed:
                logits, loss = order.run(model, S, Y)
            loss.float().backward()
            grad = 0.0
            for name, p in model.named_parameters():
                g, r = p.grad, ref.grads[name]
                if g is None:
                    grad = float("inf")
                    continue
                diff = (g.double().cpu() - r).abs().max().item()
                grad = max(grad, diff / r.abs().max().item() if r.abs().max() > 0 else diff)
            buffers = None
            if ref.buffers:
                current = model.state_dict()
                buffers = max((current[k].double().cpu() - v).abs().max().item() for k, v in ref.buffers.items())
            rows.append(
                Row(
                    order.name,
                    "train" if training else "eval",
                    (logits.detach().double().cpu() - ref.logits).abs().max().item(),
                    abs(loss.detach().double().cpu() - ref.loss).item(),
                    grad,
                    buffers,
                    tolerance,
                )
            )
            model.load_state_dict(saved)  # training mode moved the running buffers
    model.zero_grad(set_to_none=True)
    model.eval()
    return rows


def prepare(model, S: torch.Tensor, *, seed: int = 0) -> None:
    """Away from init (non-zero biases and shifts, running statistics that have moved) and at unit-scale logits, in
    place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p += 0.1 * p.abs().mean().clamp_min(0.1) * torch.randn(p.shape, generator=gen).to(p)
        for m in model.modules():  # BatchNorm: running statistics away from (0, 1)
            if hasattr(m, "running_var"):
                m.running_var.mul_(1 + 0.5 * torch.rand(m.running_var.shape, generator=gen).to(m.running_var))
                m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=gen).to(m.running_mean))
        model.eval()
        scale = model(S)[0].std()
        model.lm_head.weight /= scale
        model.lm_head.bias /= scale


def random_data(vocab_size: int, R: int, N: int, T: int, *, seed: int = 0, device="cpu"):
    """Sequences S (N, R + T - 1) and targets Y (N, T), row n valid on a prefix (right padding -100), at least 2 targets
    in all."""
    gen = torch.Generator().manual_seed(seed)
    S = torch.randint(0, vocab_size, (N, R + T - 1), generator=gen)
    Y = torch.randint(0, vocab_size, (N, T), generator=gen)
    lengths = torch.randint(1, T + 1, (N,), generator=gen)
    lengths[0] = T  # the first row full: at least 2 targets where T >= 2
    Y[torch.arange(T) >= lengths[:, None]] = IGNORE_INDEX
    return S.to(device), Y.to(device)


def table(rows: list[Row]) -> str:
    header = (
        f"{'order':<28} {'mode':<5} {'max|Δlogits|':>12} {'|Δloss|':>10} {'rel Δgrad':>10} {'Δbuffers':>10}  "
        "tolerance (logits/loss/grad)  result"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        t = r.tolerance
        buffers = "-" if r.buffers is None else f"{r.buffers:.2e}"
        lines.append(
            f"{r.order:<28} {r.mode:<5} {r.logits:>12.2e} {r.loss:>10.2e} {r.grad:>10.2e} {buffers:>10}  "
            f"{t.logits:.0e} / {t.loss:.0e} / {t.grad:.0e}{'':>9}  {'pass' if r.passed else 'FAIL'}"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from .cli import (
        _add_flag,
        _defaults_text,
        _model_defaults_text,
    )  # the training command's flags, one per config field

    parser = argparse.ArgumentParser(prog="python -m makemore.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="wavenet", help="the model to check [wavenet]")
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="float64, float32, or bfloat16 (autocast, float32 weights) [float32]",
    )
    parser.add_argument("--sequences", type=int, default=2, help="random sequences [2]")
    parser.add_argument("--outputs", type=int, default=6, help="predictions per sequence [6]")
    settings = parser.add_argument_group("model and system settings (as for makemore train)")
    train_fields = {f.name: f for f in fields(TrainConfig)}
    for name in ("device", "seed"):
        _add_flag(settings, train_fields[name], _defaults_text(train_fields[name]))
    for name in _model_flags():
        _add_flag(settings, model_fields()[name], _model_defaults_text(name), help=model_help(name))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = ["device", "seed"] + _model_flags()
    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    try:
        if args.sequences < 1 or args.outputs < 1:
            raise ValueError(f"--sequences and --outputs must be >= 1, got {args.sequences} and {args.outputs}")
        config, model_config = make_configs({"model": args.model, **given})
        device = resolve_device(config.device)
        check_device(device)
    except ValueError as e:
        print(f"makemore.check: error: {e}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    if device.type == "cpu":  # a few sequences, many small ops: extra threads only add overhead
        torch.set_num_threads(1)
    if hasattr(model_config, "dropout"):
        model_config = replace(model_config, dropout=0.0)
    torch.manual_seed(config.seed)
    model = build_model(args.model, model_config).to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    R = model.receptive_field
    S, Y = random_data(model_config.vocab_size, R, args.sequences, args.outputs, seed=config.seed, device=device)
    prepare(model, S, seed=config.seed)
    rows = compare(model, S, Y, dtype=dtype)
    mode = math_mode(dtype, device)
    print(
        f"{args.model}: receptive field {R}, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{args.sequences} x {args.outputs} outputs, "
        f"{device}, {args.dtype}, math mode {mode}"
    )
    if device.type == "cuda":
        print(
            f"TF32: {'on' if tf32_on() else 'off'} (matmul {torch.backends.cuda.matmul.allow_tf32}, "
            f"cuDNN {torch.backends.cudnn.allow_tf32}) on {torch.cuda.get_device_name(device)}"
        )
    print(table(rows))
    failed = [r for r in rows if not r.passed]
    print(
        f"{len(rows) - len(failed)} of {len(rows)} passed"
        + (f"; FAILED: {', '.join(f'{r.order} ({r.mode})' for r in failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
