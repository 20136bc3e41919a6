"""An independent float64 reference for both WaveNets, written from their equations node by node.

It shares no code with ``makemore.models`` or ``makemore.nn``: it reads a model's tensors by name
from its state dict (``state``), turns them into float64 leaves and recomputes every node it needs
as the equations below state it, one node (a position, for all sequences at once) at a time, with
gradients by autograd. ``makemore.check`` and the equivalence tests compare every evaluation order
of the models with it.

The lecture's tree (``tree``): level 0 is the embedding of each position; level l (1-based, n
levels, block size B = 2^n) fuses two nodes of level l-1 2^(l-1) positions apart,

    pre_l[p] = [h_(l-1)[p - 2^(l-1)]; h_(l-1)[p]] @ W_l,
    h_l[p] = tanh(gamma_l (pre_l[p] - mean_l) / sqrt(var_l + eps) + beta_l)

and output j of a sequence is h_n[j + B - 1] @ W_out + b_out. In eval mode (mean, var) are the
running buffers. In training mode they are the batch statistics over a population of nodes, with
the unbiased variance (the lecture's BatchNorm, eps 1e-5, momentum 0.1): the nodes of the trees
of the outputs that have a target (every output when T = 1, a window batch, or without targets),
each node counted once per tree holding it (``once_per_node`` levels: once). Which levels an
evaluation order counts once is that order's population: see ``once_per_node_levels``.

The paper's gated block (``gated``): layer k has dilation d_k = 2^(k mod n_levels) and over its
input x_k (x_0 the embedding)

    z_k[s] = tanh(Wf [x_k[s-d_k]; x_k[s]] + bf) * sigmoid(Wg [x_k[s-d_k]; x_k[s]] + bg)
    x_(k+1)[s] = x_k[s] + z_k[s] @ W_res,k                  (no residual after the last layer)
    skip[s] = skip_bias + sum_k z_k[s] @ W_skip,k,          logits[s] = relu(relu(skip[s]) @ W_h + b_h) @ W_out + b_out

at the outputs s = j + R - 1, R = 1 + sum_k d_k. Only the nodes an output needs are computed.
The loss is the mean over targets that are not -100 of -log softmax(logits)[target].
"""

import contextlib
import math
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
EPS, MOMENTUM = 1e-5, 0.1  # the lecture's BatchNorm


@dataclass
class Result:
    logits: torch.Tensor  # (N, T, V) float64
    loss: torch.Tensor | None  # () float64, None without targets
    grads: dict  # parameter name -> float64 gradient of the loss (empty without targets)
    buffers: dict  # training mode: each running buffer's new value, by name


def once_per_node_levels(order: str, T: int, n_levels: int) -> int:
    """How many of the lowest tree levels an order's training statistics count once per distinct node.

    The per-window orders count a node once per window holding it. The convolutions compute
    level l over the whole sequence when outputs share its nodes (2^l <= T) and count each node
    once; the levels above are finished per window, counted once per window. A window batch
    (T = 1) is per window in every order.
    """
    if order == "windows" or T == 1:
        return 0
    return min(n_levels, int(math.log2(T)))


@contextlib.contextmanager
def _one_thread():
    """Thousands of vector-sized ops: extra threads only add overhead, many times over on a busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _leaves(state: dict) -> dict:
    return {name: t.detach().to("cpu", torch.float64).requires_grad_(not _is_buffer(name)) for name, t in state.items()}


def _is_buffer(name: str) -> bool:
    return name.endswith(("running_mean", "running_var", "num_batches_tracked"))


def _loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    if targets is None:
        return None
    targets = targets.cpu()
    valid = targets != IGNORE_INDEX
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    picked = logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return -(picked * valid).sum() / valid.sum()


def _finish(logits, targets, params, buffers) -> Result:
    loss = _loss(logits, targets)
    grads = {}
    if loss is not None:
        names = [n for n, p in params.items() if p.requires_grad]
        found = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        grads = {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, found)}
    return Result(logits.detach(), None if loss is None else loss.detach(), grads, buffers)


def tree(
    state: dict,
    idx: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    training: bool = False,
    once_per_node: int = 0,
) -> Result:
    """The lecture's hierarchical WaveNet on sequences ``idx (N, L)``: logits (N, L - B + 1, V), loss, gradients."""
    with _one_thread():
        return _tree(state, idx, targets, training, once_per_node)


def _tree(state, idx, targets, training, once_per_node) -> Result:
    P = _leaves(state)
    n = sum(1 for name in P if name.startswith("blocks.") and name.endswith(".linear.weight"))
    B = 2**n
    idx = idx.cpu()
    N, L = idx.shape
    T = L - B + 1
    tops = [j + B - 1 for j in range(T)]  # the top node of output j, by position
    if training and targets is not None and T > 1:
        valid = (targets.cpu() != IGNORE_INDEX).to(torch.float64)  # (N, T)
    else:
        valid = torch.ones(N, T, dtype=torch.float64)
    h = {p: P["wte.weight"][idx[:, p]] for p in range(L)}  # level 0: position -> (N, C)
    buffers = {}
    for level in range(1, n + 1):
        d, span = 2 ** (level - 1), 2**level
        # Output j's tree holds level `level` at positions top_j - m * 2^level, m = 0 .. B / 2^level - 1.
        count: dict[int, torch.Tensor] = {}
        for j, top in enumerate(tops):
            for m in range(B // span):
                p = top - m * span
                count[p] = count.get(p, 0) + valid[:, j]
        positions = sorted(count)
        W = P[f"blocks.{level - 1}.linear.weight"]
        pre = torch.stack(
            [torch.cat([h[p - d], h[p]], dim=-1) @ W for p in positions], 1
        )  # (N, nodes, H), node by node
        prefix = f"blocks.{level - 1}.bn."
        if training:
            w = torch.stack([count[p] for p in positions], 1)  # (N, nodes): how often each node is counted
            if level <= once_per_node:
                w = (w > 0).to(torch.float64)
            w = w[..., None]
            total = w.sum()
            mean = (pre * w).sum((0, 1)) / total
            var = ((pre - mean) ** 2 * w).sum((0, 1)) / (total - 1)
            with torch.no_grad():
                buffers[prefix + "running_mean"] = (1 - MOMENTUM) * P[prefix + "running_mean"] + MOMENTUM * mean
                buffers[prefix + "running_var"] = (1 - MOMENTUM) * P[prefix + "running_var"] + MOMENTUM * var
        else:
            mean, var = P[prefix + "running_mean"], P[prefix + "running_var"]
        out = torch.tanh(P[prefix + "weight"] * (pre - mean) / torch.sqrt(var + EPS) + P[prefix + "bias"])
        h = {p: out[:, i] for i, p in enumerate(positions)}
    top = torch.stack([h[p] for p in tops], 1)  # (N, T, H)
    logits = top @ P["lm_head.weight"] + P["lm_head.bias"]
    return _finish(logits, targets, P, buffers)


def gated(state: dict, idx: torch.Tensor, targets: torch.Tensor | None = None, *, n_levels: int) -> Result:
    """The gated residual WaveNet on sequences ``idx (N, L)``, its dilations from ``n_levels``:
    logits (N, L - R + 1, V), loss, gradients."""
    with _one_thread():
        return _gated(state, idx, targets, n_levels)


def _gated(state, idx, targets, n_levels) -> Result:
    P = _leaves(state)
    K = sum(1 for name in P if name.startswith("layers.") and name.endswith(".conv.weight"))
    if K % n_levels:
        raise ValueError(f"{K} layers are not whole stacks of {n_levels} levels")
    dilation = [2 ** (k % n_levels) for k in range(K)]
    R = 1 + sum(dilation)
    idx = idx.cpu()
    N, L = idx.shape
    outputs = list(range(R - 1, L))
    # Top down: the positions at which each layer's input (need_x) and gate (need_z) are needed.
    need_z, need_x, above = [None] * K, [None] * K, set()
    for k in reversed(range(K)):
        need_z[k] = set(outputs) | above  # the skip at every output; the residual stream above
        need_x[k] = need_z[k] | {s - dilation[k] for s in need_z[k]}
        above = need_x[k]
    x = {s: P["wte.weight"][idx[:, s]] for s in need_x[0]}
    G = P["layers.0.conv.weight"].shape[1] // 2
    skip = {s: P["skip_bias"].expand(N, -1) for s in outputs}
    for k in range(K):
        W, b, d = P[f"layers.{k}.conv.weight"], P[f"layers.{k}.conv.bias"], dilation[k]
        res = P.get(f"layers.{k}.res.weight")
        z = {}
        for s in sorted(need_z[k]):  # node by node
            y = torch.cat([x[s - d], x[s]], dim=-1) @ W + b  # (N, 2G)
            z[s] = torch.tanh(y[:, :G]) * torch.sigmoid(y[:, G:])
        for s in outputs:
            skip[s] = skip[s] + z[s] @ P[f"layers.{k}.skip.weight"]
        if k + 1 < K:
            x = {s: x[s] + z[s] @ res for s in need_x[k + 1]}
    top = torch.stack([skip[s] for s in outputs], 1)  # (N, T, S)
    hidden = torch.relu(torch.relu(top) @ P["head.weight"] + P["head.bias"])
    logits = hidden @ P["lm_head.weight"] + P["lm_head.bias"]
    return _finish(logits, targets, P, {})
