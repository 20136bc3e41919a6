"""kernels.cross_entropy against F.cross_entropy: forward + backward time and peak memory.

``kernels.cross_entropy`` as a user calls it (backend "auto": the Triton kernel on CUDA; on CPU
the fused fallback, or F.cross_entropy itself below ATEN_BELOW logits), the fused fallback forced
(backend "torch"), and F.cross_entropy. N = 4096 rows; V = 27 and 65 are makemore's character
vocabularies, 32,768, 50,257 and 131,072 (CUDA only: 2 GiB a buffer) LLM-sized ones.

    python -m pytest bench/bench_cross_entropy.py --benchmark-json=bench/results/cross_entropy.json [--device cuda]
    python -m bench.report bench/results/cross_entropy.json --out bench/results

``peak_mib`` counts the gradient that ends in ``logits.grad``; ``nv_buffers`` is the same peak
in units of one (N, V) logits-sized buffer.
"""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from makemore.kernels import cross_entropy

N = 4096
VOCABS = [27, 65, 32768, 50257, 131072]
IMPLEMENTATIONS = {
    "kernels.cross_entropy": cross_entropy,
    "fused fallback": partial(cross_entropy, backend="torch"),
    "F.cross_entropy": F.cross_entropy,
}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("v", VOCABS)
def test_forward_backward(benchmark, measure, device, v, impl):
    if v > 50257 and device.type != "cuda":
        pytest.skip("V = 131,072 runs on CUDA only: F.cross_entropy needs 6 GiB and seconds a call on CPU")
    generator = torch.Generator(device).manual_seed(0)
    logits = torch.randn(N, v, generator=generator, device=device).requires_grad_()
    target = torch.randint(0, v, (N,), generator=generator, device=device)
    loss_fn = IMPLEMENTATIONS[impl]

    def step():
        loss_fn(logits, target).backward()
        logits.grad = None

    benchmark.group = f"cross-entropy fwd+bwd, N={N} V={v}"
    benchmark.extra_info.update(impl=impl, n=N, v=v, baseline=impl == "F.cross_entropy")
    measure(benchmark, step)
    buffer_mib = logits.numel() * logits.element_size() / 2**20
    benchmark.extra_info["nv_buffers"] = round(benchmark.extra_info["peak_mib"] / buffer_mib, 2)
