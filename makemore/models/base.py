"""The contract every makemore model keeps, and generation on top of it.

``forward(idx (N, L) int64, targets (N, T) | None) -> (logits (N, T, V), loss | None)``.
A model's receptive field R slides over the sequence: T = L - R + 1 outputs, output j predicting
the token after position j + R - 1. A window batch is the special case L = R, T = 1. Targets are
``IGNORE_INDEX`` (-100) where there is nothing to predict; models that need a mask (BatchNorm's
statistics over the valid positions) derive it from ``targets``. Token ids are checked where they
are made (encoding, the CLI, ``generate``'s prompt), not in ``forward``, and nothing in
``forward`` reads a tensor value back to the host.

``generate`` is one loop over ``prefill`` / ``step``. The default cache is the last R tokens,
re-run through ``forward`` for each new token; the WaveNets override both with ``Rings``, one ring
buffer per level. Caches have static shapes and ``step`` updates them in place (a position is a
0-dim device tensor, never a Python int), and sampling reads nothing back to the host, so one
token (step + sampling) on CUDA is captured once as a CUDA graph and replayed (``CUDAGraphed``).
"""

from functools import partial

import torch
from torch import nn

from ..data import IGNORE_INDEX
from ..kernels import cross_entropy


class LanguageModel(nn.Module):
    vocab_size: int
    receptive_field: int  # R: the tokens one prediction sees
    # Fitted in one pass over the data by ``fit(batches)`` (counts, the lecture's full-batch bigram),
    # not trained in steps.
    fitted: bool = False
    # Normalises over the batch (BatchNorm): one row alone has no variance,
    # and DDP's ranks would see different statistics.
    batch_statistics: bool = False
    # The loss writes its gradient over the logits during forward (cross_entropy's inplace_grad: 2 passes over the
    # logits instead of 3). Only for a forward whose logits nothing else reads afterwards: the trainer sets it.
    loss_in_place: bool = False

    def outputs(self, length: int) -> int:
        """T, the number of predictions for a sequence of ``length`` tokens; a clear error below R."""
        if length < self.receptive_field:
            raise ValueError(
                f"{type(self).__name__} sees {self.receptive_field} tokens per prediction; got sequences of {length} "
                "(left-pad them with token 0)"
            )
        return length - self.receptive_field + 1

    def loss(self, logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
        """Mean cross-entropy over the targets that are not IGNORE_INDEX (classes last)."""
        if targets is None:
            return None
        return cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, inplace_grad=self.loss_in_place)

    def check_tokens(self, idx: torch.Tensor) -> None:
        """One clear error for token ids outside [0, vocab_size): for ids from outside (prompts), not per step."""
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be int64 or int32, got {idx.dtype}")
        bad = (idx < 0) | (idx >= self.vocab_size)
        if idx.numel() and bad.any():  # (an empty prompt, the usual start, costs no host read)
            raise ValueError(
                f"token id {idx[bad][0].item()} is out of range for a vocabulary of {self.vocab_size} "
                f"(valid: 0..{self.vocab_size - 1})"
            )

    # Generation: prefill the context, then one step per new token.

    def prefill(self, idx: torch.Tensor):
        """Logits (N, V) for the token after ``idx (N, T0)`` (left-padded with token 0) and a cache to continue from."""
        window = left_pad(idx, self.receptive_field)[
            :, -self.receptive_field :
        ].clone()  # (N, R): ours to update in place
        return self(window)[0][:, -1], window

    def step(self, token: torch.Tensor, cache):
        """Append ``token (N,)`` to the sequence ``cache`` ends:
        (logits (N, V) for the next token, the cache, updated in place)."""
        cache.copy_(torch.cat([cache[:, 1:], token[:, None]], dim=1))  # the window moves on by one token
        return self(cache)[0][:, -1], cache

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        cached: bool = True,
        cuda_graph: bool = True,
    ) -> torch.Tensor:
        """Extend ``idx (N, T0)`` by ``max_new_tokens`` sampled tokens: ``(N, T0 + max_new_tokens)``.

        ``cached=False`` uses the default cache whatever the model (re-run the last R tokens per
        token), so the two can be compared: with the same generator they give the same tokens.
        ``cuda_graph``: on CUDA, capture one token (step + sampling) as a CUDA graph and replay it
        per token (see ``CUDAGraphed``); elsewhere the same token function runs as a plain loop.
        The prompt's check is the only host read.
        """
        check_sampling(temperature, top_k)
        self.check_tokens(idx)
        if max_new_tokens == 0:
            return idx
        prefill, step = (
            (self.prefill, self.step)
            if cached
            else (partial(LanguageModel.prefill, self), partial(LanguageModel.step, self))
        )
        sample = partial(sample_next, temperature=temperature, top_k=top_k, generator=generator)
        logits, cache = prefill(idx)
        token = sample(logits)  # (N,): a static buffer from here on, read and rewritten by every step
        out = token.new_empty(idx.shape[0], max_new_tokens)
        out[:, 0] = token
        advance = partial(next_token, step, token, cache, sample)
        if cuda_graph and token.is_cuda and max_new_tokens > 2:  # a graph pays for its capture from the third token on
            advance = CUDAGraphed(advance, generator)
        for i in range(1, max_new_tokens):
            advance()
            out[:, i] = token
        return torch.cat([idx, out], dim=1)


def next_token(step, token: torch.Tensor, cache, sample) -> None:
    """One generated token, in place: ``token (N,)`` goes through ``step`` (which updates ``cache`` in place)
    and is replaced by a sample of the logits that follow it. Static buffers only: CUDA-graph capturable."""
    logits, returned = step(token, cache)
    if returned is not cache:  # a new cache object would be dropped here (and is not capturable)
        raise TypeError(
            "a model's step must update its cache in place and return that same cache "
            "(static buffers: see makemore/models/base.py)"
        )
    token.copy_(sample(logits))


class CUDAGraphed:
    """``fn`` (no arguments, static buffers only) as a CUDA graph: the first call runs it eagerly on a
    side stream (a real call that also warms up lazy initialisation, such as cuBLAS handles) and
    captures it; every later call replays the capture. ``generator``, the CUDA generator ``fn`` draws
    from (None: the default one, which capture registers itself), is registered with the graph so
    that each replay draws from its current state and advances it, as an eager call would (the
    CUDA test test_cuda_graph_generation_gives_the_loops_tokens checks the tokens). torch.cuda.graph's
    context is not used: it synchronises the device, a host wait that the graph does not need.
    """

    def __init__(self, fn, generator: torch.Generator | None = None):
        self.fn, self.generator, self.graph = fn, generator, None

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.fn()  # this call's work, eagerly
            graph = torch.cuda.CUDAGraph()
            if self.generator is not None:
                graph.register_generator_state(self.generator)
            graph.capture_begin()
            self.fn()  # recorded, not run: the next call replays it
            graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = graph


class Rings:
    """A cache of ring buffers for dilated layers, for cached generation (Paine et al. 2016).

    A layer of dilation d pairs its input at position s with its input at s - d, so ring i holds
    the last d nodes (N, d, C) of layer i's input. ``prefill`` fills ring i with the nodes at
    positions R - d .. R - 1 of its window, in order; ``pos`` counts the steps taken since, so
    step ``pos`` writes the new position into slot ``pos mod d``, where its left child (d positions
    back) sat. ``pos`` is a 0-dim int64 tensor on the rings' device, updated in place, and slots are
    chosen by index_select / index_copy_ with it: no Python int varies from step to step, so a step
    can be captured in a CUDA graph or compiled whole. ``fixed`` holds what a model computes once per
    generation and reuses at every step (the lecture's WaveNet: BatchNorm folded into its Linears).
    """

    def __init__(self, nodes: list[torch.Tensor], fixed=None):
        self.rings = [n.clone(memory_format=torch.contiguous_format) for n in nodes]  # (N, d, C): ours to overwrite
        self.pos = torch.zeros((), dtype=torch.int64, device=nodes[0].device)
        self.fixed = fixed

    def swap(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Ring i takes the new node ``x (N, C)`` and gives back the node d positions before it: (N, C)."""
        ring = self.rings[i]
        slot = torch.remainder(self.pos, ring.shape[1]).view(1)
        left = ring.index_select(1, slot).squeeze(1)  # a copy: the slot is overwritten next
        ring.index_copy_(1, slot, x.to(ring.dtype).unsqueeze(1))
        return left

    def advance(self) -> None:
        self.pos += 1


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's (bfloat16 under ``--dtype bfloat16``) where it is on, else x's.

    For code that calls matmuls autocast leaves alone (in-place addmm_, hand-written backwards): casting
    operands to it gives autocast's GEMMs while sums that must not round to bfloat16 stay in float32.
    """
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def sliding_windows(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, L, ...) -> (N, L - size + 1, size, ...): window j holds positions j .. j + size - 1, oldest first."""
    return x.unfold(1, size, 1).movedim(-1, 2)


def left_pad(idx: torch.Tensor, length: int, value: int = 0) -> torch.Tensor:
    """Left-pad ``idx (N, T)`` with ``value`` to at least ``length`` columns."""
    missing = length - idx.shape[1]
    if missing <= 0:
        return idx
    return torch.cat([idx.new_full((idx.shape[0], missing), value), idx], dim=1)


def check_sampling(temperature: float, top_k: int | None) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``logits (N, V)`` from softmax(logits / temperature), kept to the top_k: ``(N,)``.

    The exponential race: with q_i ~ Exp(1) independent, argmax_i p_i / q_i is token i with
    probability p_i (the first of V exponential clocks of rates p_i to ring). In log space it is
    argmax_i (logits_i / temperature - log q_i), softmax's normaliser being the same for every i.
    Nothing is read back to the host (torch.multinomial's one-sample path reads twice per call),
    and each call draws V numbers per row from ``generator``, whatever the logits.
    """
    scores = logits.float() / temperature  # (N, V)
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # (N, 1): a slice, not a list index (a host read)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    q = torch.empty_like(scores).exponential_(generator=generator)
    q = q.clamp_min_(torch.finfo(q.dtype).tiny)  # log(0) = -inf would win the race, or make -inf - -inf = nan
    return (scores - q.log()).argmax(-1)
