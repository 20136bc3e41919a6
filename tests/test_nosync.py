"""Nothing on the hot path reads a tensor back to the host, proved by compiling it whole.

``torch.compile(fullgraph=True)`` raises at any graph break: a host read (``.item()``,
``bool(tensor)``, ``.tolist()``, a shape that depends on values), a data-dependent Python branch
or an untraceable call. (Copies the other way, a Python value made a device tensor such as
``x.new_tensor(n)`` or a list index, trace fine; on CUDA they wait on the host, which the
sync-debug test below catches.) A training step (forward, makemore's ``cross_entropy``, backward,
the optimiser step) and a generated token (a cached step and its sampling) compile here for both
WaveNets; the models are tiny, and the backend is aot_eager, because graph breaks are found
while tracing (dynamo, then AOTAutograd for the backward) and inductor's code generation would
only add minutes. Each compiled result is checked against eager, so a wrong trace fails too.

On CUDA the same claims are checked where they matter, under ``torch.cuda.set_sync_debug_mode
("error")``: a training step and a 64-token generation, CUDA graphs included.
"""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from makemore.data import IGNORE_INDEX
from makemore.models import GatedWaveNet, GatedWaveNetConfig, WaveNet, WaveNetConfig
from makemore.models.base import next_token, sample_next

MODELS = {
    "wavenet": lambda: WaveNet(WaveNetConfig(11, 8, 6, 10)),
    "wavenet-fused": lambda: WaveNet(WaveNetConfig(11, 8, 6, 10, fused=True)),
    "gated": lambda: GatedWaveNet(GatedWaveNetConfig(11, 6, 5, 7, n_levels=2, stacks=2, dropout=0.1)),
}
BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batch(model, generator):
    """Sequences whose targets end in padding (IGNORE_INDEX): the masked BatchNorm statistics are traced.
    6 outputs a sequence: the WaveNet's first 2 levels run as convolutions, its third per window."""
    R = model.receptive_field
    idx = torch.randint(0, 11, (3, R + 5), generator=generator)
    targets = torch.randint(0, 11, (3, 6), generator=generator)
    targets[0, -3:] = IGNORE_INDEX
    return idx, targets


@pytest.mark.parametrize("name", MODELS)
def test_a_training_step_compiles_whole(name):
    torch.manual_seed(0)
    model = MODELS[name]().train()
    reference = copy.deepcopy(model)
    idx, targets = batch(model, torch.Generator().manual_seed(1))

    def loss_of(m):
        return m(idx, targets)[1]

    torch.manual_seed(2)  # the same dropout masks in both
    loss = torch.compile(loss_of, backend=BACKEND, fullgraph=True)(model)
    torch.manual_seed(2)
    expected = loss_of(reference)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for (name_, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name_)
    for b, c in zip(model.buffers(), reference.buffers(), strict=True):  # BatchNorm's running statistics
        torch.testing.assert_close(b, c)


def test_the_optimiser_step_compiles_but_for_torchs_own_breaks():
    """torch.optim's step wrapper breaks the graph on purpose (``torch._dynamo.graph_break()`` in
    ``_use_grad``, so fullgraph=True cannot hold), and dynamo does not trace the fused AdamW the
    loop uses; the foreach AdamW compiles. Checked: the only breaks are such user-inserted ones
    (makemore inserts none), and the compiled step is the eager one."""
    torch.manual_seed(0)
    model = MODELS["gated"]()
    reference = copy.deepcopy(model)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=True) for m in (model, reference)]
    counters.clear()
    torch.compile(lambda: optimizers[0].step(), backend=BACKEND)()
    optimizers[1].step()
    assert counters["stats"]["unique_graphs"] >= 1  # the update itself was traced
    assert all("User-inserted graph break" in reason for reason in counters["graph_break"]), dict(
        counters["graph_break"]
    )
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("name", ["wavenet", "gated"])
@torch.no_grad()  # as generate runs
def test_a_generated_token_compiles_whole(name):
    """One cached step with its sampling (top-k, temperature), as generate runs it: in place on static buffers.

    Sampling draws from the global generator here: dynamo does not trace a torch.Generator argument
    (generate's eager loop and its CUDA graph take one)."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    prompt = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1))
    tokens, caches = [], []
    for _ in range(2):
        logits, cache = model.prefill(prompt)
        tokens.append(logits.argmax(-1))
        caches.append(cache)

    def sample(logits):
        return sample_next(logits, temperature=0.8, top_k=5)

    compiled = torch.compile(next_token, backend=BACKEND, fullgraph=True)
    for _ in range(3):  # the position moves on in place: still one graph
        torch.manual_seed(3)
        compiled(model.step, tokens[0], caches[0], sample)
        torch.manual_seed(3)
        next_token(model.step, tokens[1], caches[1], sample)
        assert torch.equal(tokens[0], tokens[1])
    assert int(caches[0].pos) == int(caches[1].pos) == 3
    for a, b in zip(caches[0].rings, caches[1].rings, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["loop", "cuda-graph"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("device", ["cuda"])
def test_no_host_sync_on_cuda(device, name, cuda_graph):
    """A training step (bfloat16 autocast, the loop's fused AdamW) and a 64-token generation with a
    generator: any synchronising call raises under sync debug mode "error"."""
    torch.manual_seed(0)
    model = MODELS[name]().to(device)
    idx, targets = (t.to(device) for t in batch(model, torch.Generator().manual_seed(1)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    generator = torch.Generator(device).manual_seed(0)
    empty = torch.zeros(8, 0, dtype=torch.int64, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(idx, targets)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        out = model.generate(empty, 64, top_k=5, generator=generator, cuda_graph=cuda_graph)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (8, 64) and bool(torch.isfinite(loss))
