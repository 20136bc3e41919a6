"""The Transformer baseline keeps the model contract: each output sees exactly its last R tokens.

The reference is the GPT written again in float64 over the whole sequence, sharing no code with
the model: every layer at every position (no trimming, no query blocks), its window a dense mask,
rotary angles at absolute positions. Against it: the forward (blocked sliding-window attention, each
layer shortening the sequence), one window at a time (the contract), and the cached prefill/step,
run past R so that every ring wraps several times, at receptive fields from 1 to 300 over 1 to 4
layers (windows of 1, uneven windows, several query blocks with a padded last one).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from makemore.check import cached_logits
from makemore.data import IGNORE_INDEX
from makemore.models import Transformer, TransformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# (block_size R, n_layer, sequences, outputs per sequence): windows of 1 (R 1; R 3 over 4 layers: 1, 1, 2, 2),
# uneven windows (R 64 over 4: 16, 17, 17, 17), several query blocks with a padded last one (R 200 over 2:
# windows 100, 101, blocks of 50, 130 outputs).
CASES = [(1, 1, 2, 5), (3, 4, 2, 7), (10, 3, 3, 40), (64, 4, 2, 70), (200, 2, 2, 130)]


def make(block_size, n_layer, seed=0, vocab_size=11, **kw) -> Transformer:
    torch.manual_seed(seed)
    config = TransformerConfig(
        vocab_size, block_size=block_size, n_layer=n_layer, **{"n_head": 2, "n_embd": 8, "tie_weights": False, **kw}
    )
    model = Transformer(config)
    with torch.no_grad():  # away from init (N(0, 0.02)): unit-scale logits and gains, so that no term can hide
        for _name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def reference(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    """The logits (N, T, V) in float64: every layer over every position, a dense window mask, absolute positions."""
    c = model.config
    P = {name: p.detach().double() for name, p in model.named_parameters()}
    N, L = idx.shape
    H, D = c.n_head, c.n_embd // c.n_head
    inv_freq = 10_000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = torch.arange(L, dtype=torch.float64)[:, None] * inv_freq  # (L, D/2)

    def rope(t):  # (N, H, L, D): pairs (i, i + D/2) rotated by position x frequency
        a, b = t[..., : D // 2], t[..., D // 2 :]
        return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], -1)

    def norm(x, name):
        return F.layer_norm(x, (c.n_embd,), P[name + ".weight"])

    x = P["wte.weight"][idx]  # (N, L, C)
    i, j = torch.arange(L)[:, None], torch.arange(L)
    for k, W in enumerate(c.windows):
        pre = f"blocks.{k}."
        q, kk, v = (norm(x, pre + "ln_1") @ P[pre + "attn.c_attn.weight"].T).split(c.n_embd, -1)
        q, kk, v = (t.view(N, L, H, D).transpose(1, 2) for t in (q, kk, v))
        scores = rope(q) @ rope(kk).transpose(-1, -2) / math.sqrt(D)  # (N, H, L, L)
        scores = scores.masked_fill(~((j <= i) & (j > i - W)), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(N, L, c.n_embd)
        x = x + y @ P[pre + "attn.c_proj.weight"].T
        h = F.gelu(norm(x, pre + "ln_2") @ P[pre + "mlp.c_fc.weight"].T)
        x = x + h @ P[pre + "mlp.c_proj.weight"].T
    logits = norm(x, "ln_f") @ P["lm_head.weight"].T
    return logits[:, model.receptive_field - 1 :]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"R{c[0]}x{c[1]}")
def test_forward_windows_and_cache_are_the_reference(case, device):
    R, n_layer, N, T = case
    model = make(R, n_layer).to(device).eval()
    assert model.receptive_field == R and sum(w - 1 for w in model.config.windows) == R - 1
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 11, (N, R - 1 + T), generator=gen)
    targets = torch.randint(0, 11, (N, T), generator=gen).masked_fill(
        torch.rand(N, T, generator=gen) < 0.3, IGNORE_INDEX
    )
    expected = reference(model.cpu(), idx)
    assert 0.5 < expected.std() < 3  # unit scale: the absolute bounds below mean what they say
    model.to(device)
    idx, targets = idx.to(device), targets.to(device)
    logits, loss = model(idx, targets)
    assert logits.shape == (N, T, 11) and model(idx)[1] is None
    torch.testing.assert_close(logits.double().cpu(), expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    windows = torch.stack([model(idx[:, j : j + R])[0][:, 0] for j in range(T)], 1)  # each window on its own
    torch.testing.assert_close(windows.double().cpu(), expected, rtol=0, atol=2e-5)
    with torch.no_grad():  # prefill the first window, then T - 1 steps: every ring wraps (T - 1) / W times
        torch.testing.assert_close(cached_logits(model, idx).double().cpu(), expected, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match=f"sees {R} tokens per prediction; got sequences of {R - 1} \\(left-pad"):
        model(idx[:, : R - 1])


@pytest.mark.parametrize("R, T0", [(8, 0), (8, 3), (33, 50)])
def test_cached_and_rerun_generation_give_the_same_tokens(R, T0, device):
    model = make(R, 2, vocab_size=27, n_embd=16).to(device).eval()
    idx = torch.randint(1, 27, (5, T0), device=device)
    outs = [
        model.generate(
            idx, 3 * R + 5, temperature=0.9, top_k=10, generator=torch.Generator(device).manual_seed(7), cached=cached
        )
        for cached in (False, True)
    ]
    assert outs[0].shape == (5, T0 + 3 * R + 5) and torch.equal(outs[0][:, :T0], idx)
    assert torch.equal(outs[0], outs[1])


def test_every_parameter_gets_a_finite_gradient_and_dropout_only_while_training():
    model = make(12, 3, dropout=0.3)
    idx = torch.randint(0, 11, (3, 40))
    _, loss = model(idx, torch.randint(0, 11, (3, 29)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    assert not torch.equal(model(idx)[0], model(idx)[0])  # dropout draws new masks while training
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_tied_weights_and_parameter_count():
    C, V, n_layer = 32, 65, 3
    tied = Transformer(TransformerConfig(V, block_size=64, n_layer=n_layer, n_head=4, n_embd=C))
    assert tied.lm_head.weight is tied.wte.weight
    per_block = 3 * C * C + C * C + 8 * C * C + 2 * C  # qkv, proj, MLP, two LayerNorm gains
    assert sum(p.numel() for p in tied.parameters()) == V * C + n_layer * per_block + C
    untied = Transformer(TransformerConfig(V, block_size=64, n_layer=n_layer, n_head=4, n_embd=C, tie_weights=False))
    assert sum(p.numel() for p in untied.parameters()) == 2 * V * C + n_layer * per_block + C


def test_windows_split_the_receptive_field():
    assert TransformerConfig(block_size=64, n_layer=4).windows == [16, 17, 17, 17]  # 15 + 16 + 16 + 16 = 63
    assert TransformerConfig(block_size=1025, n_layer=4).windows == [257] * 4
    assert TransformerConfig(block_size=2, n_layer=3).windows == [1, 1, 2]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(n_embd=12, n_head=4), r"--n-embd \(12\) must be a multiple of 2 x --n-head \(4\)"),
        (dict(n_embd=10, n_head=4), r"--n-embd \(10\) must be a multiple of 2 x --n-head \(4\)"),
        (dict(block_size=0), "--block-size must be >= 1, got 0"),
        (dict(n_layer=0), "--n-layer must be >= 1, got 0"),
        (dict(dropout=1.0), r"--dropout must be in \[0, 1\), got 1.0"),
    ],
)
def test_config_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**kw)


def test_runs_under_bf16_autocast_with_float32_weights(device):
    model = make(40, 4, n_embd=32, n_head=4).to(device)
    idx = torch.randint(0, 11, (2, 100), device=device)
    targets = torch.randint(0, 11, (2, 61), device=device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        full = model(idx)[0].float()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            low = model(idx)[0].float()
            cached = cached_logits(model, idx).float()
    scale = full.abs().max()
    assert (low - full).abs().max() < 0.05 * scale  # bf16 has 8 bits of mantissa: a few percent after 4 layers
    assert (cached - full).abs().max() < 0.05 * scale


def test_forward_and_a_cached_step_compile_whole():
    """fullgraph=True fails on any graph break (a host read, a data-dependent branch): the forward with
    its backward, and one cached step on a cache whose position is a device tensor."""
    model = make(10, 2)
    idx = torch.randint(0, 11, (2, 30))
    targets = torch.randint(0, 11, (2, 21))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits, loss = compiled(idx, targets)
    loss.backward()
    torch.testing.assert_close(logits, model(idx)[0])
    model.eval()
    with torch.no_grad():
        _, cache = model.prefill(idx[:, :10])
        _, eager_cache = model.prefill(idx[:, :10])
        step = torch.compile(model.step, fullgraph=True, backend="aot_eager")
        for t in range(10, 14):  # past the smallest window: the ring's slot comes from the position tensor
            logits, cache = step(idx[:, t], cache)
            expected, eager_cache = model.step(idx[:, t], eager_cache)
            torch.testing.assert_close(logits, expected)
    assert cache.pos.ndim == 0 and cache.pos.dtype == torch.int64 and int(cache.pos) == 14


def test_trains_saves_and_samples_through_the_cli(tmp_path, capsys):
    from makemore.cli import load_model, main

    out = tmp_path / "run"
    model_flags = "--model transformer --block-size 16 --n-layer 2 --n-head 2 --n-embd 16"
    data_flags = "--data tinyshakespeare --layout sequences --seq-len 32 --batch-size 4"
    run_flags = "--optimizer adamw --lr 3e-3 --min-lr 3e-4 --max-steps 3 --eval-max-tokens 2000 --quiet --samples 0"
    argv = f"train {model_flags} {data_flags} {run_flags}".split() + ["--out", str(out)]
    assert main(argv) == 0
    model, state = load_model(out)
    assert isinstance(model, Transformer) and model.receptive_field == 16 and state["step"] == 3
    capsys.readouterr()
    assert main(["sample", "--out", str(out), "--length", "40", "--prompt", "ROMEO:"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_two_processes_train_as_one_on_the_global_batch(tmp_path):
    """Under torchrun (gloo), 2 processes x 8 windows: the parameters after 3 AdamW steps are one process's on the
    16 rows (the tolerance is test_distributed's: float32 rounding of the averaged gradients, where one wrong batch
    moves ~lr)."""
    from test_distributed import REPORTING, flags, single_process_on_the_global_batch, torchrun

    from makemore import checkpoint
    from makemore.train import CHECKPOINT

    tiny = dict(model="transformer", block_size=8, n_layer=2, n_head=2, n_embd=8)
    settings = dict(tiny, batch_size=8, optimizer="adamw", lr=1e-2, decay_at=1.0, dtype="float32")
    result = torchrun(*flags(settings), "--max-steps", 3, *REPORTING, "--out", tmp_path / "ddp")
    assert result.returncode == 0, result.stderr
    ours = checkpoint.load(tmp_path / "ddp" / CHECKPOINT)
    theirs, losses = single_process_on_the_global_batch(settings, 3)
    assert ours["world_size"] == 2 and set(ours["model"]) == set(theirs)
    for name, value in theirs.items():
        torch.testing.assert_close(ours["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(ours["losses"], losses, rtol=1e-5, atol=1e-6)
