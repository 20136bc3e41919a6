"""More than one process: torchrun's environment, the process group, and the few collectives the loop needs.

Launched by torchrun (it sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``), ``makemore train``
trains with DistributedDataParallel: one process per rank, gloo between CPU processes, nccl between
GPUs (``--device cuda`` is ``cuda:LOCAL_RANK``). Without torchrun every helper here is a no-op for
one process, so a plain run is unchanged.

What is per rank: the batches (``--batch-size`` rows each, from a stream of the rank's own) and the
clock. What rank 0 alone does: checkpoints, evaluation, metrics.jsonl, loss.png and printing; the
other ranks wait at a barrier meanwhile.
"""

import datetime
import hashlib
import os
import time

import torch
import torch.distributed as dist

_owned = False  # whether setup() made the process group, so teardown() destroys only ours


def launched() -> bool:
    """Started by torchrun (or another launcher that sets RANK and WORLD_SIZE): train as one rank of a group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ["RANK"]) if launched() else 0


def world_size() -> int:
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes, evaluates and prints."""
    return rank() == 0


def stream_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s batch stream (rank > 0; rank 0 keeps the single-process stream)."""
    return int.from_bytes(hashlib.sha256(f"makemore batches {seed} {rank}".encode()).digest()[:8], "little") >> 1


def check_supported(model_name: str, model: torch.nn.Module) -> None:
    """One clear error, raised alike by every rank before any joins the group (so none waits for another), for a
    model that cannot train in more than one process."""
    if model.fitted:
        raise ValueError(
            f"--model {model_name} is fitted in one pass over the data, not trained in steps; run it without torchrun"
        )
    if model.batch_statistics:
        raise ValueError(
            f"--model {model_name} uses BatchNorm, "
            f"whose batch statistics would differ between the {world_size()} processes; "
            "train it without torchrun, or use --model gated (no normalisation) under torchrun"
        )


def setup(on: torch.device, timeout: float) -> None:
    """Join the process group (torchrun's rendezvous, through the environment):
    gloo for CPU tensors, nccl for CUDA ones.

    On CUDA the group has both backends, so the loop's host-side collectives (the clock, the
    generators' states, barriers) go through gloo and never wait on the GPU. A collective that waits
    more than ``timeout`` seconds for a peer fails (torch's default is 30 minutes).
    """
    global _owned
    backend = "gloo"
    if on.type == "cuda":
        torch.cuda.set_device(on)
        backend = "cpu:gloo,cuda:nccl"
    timeout = datetime.timedelta(seconds=timeout)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restart != "0":
        # After an elastic restart torchrun's agent keeps its store, with the last attempt's gloo addresses
        # in it: a rank that read a dead peer's address failed to connect ("Connection refused", 1 restart
        # in 4 here). A prefix per attempt gives every attempt keys of its own.
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size(), is_master=False, timeout=timeout
        )
        store = dist.PrefixStore(f"makemore/attempt_{restart}", store)
        dist.init_process_group(backend, store=store, rank=rank(), world_size=world_size(), timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    _owned = True


def teardown() -> None:
    """Leave the process group setup() made, if any (also after an error)."""
    global _owned
    if _owned and dist.is_initialized():
        dist.destroy_process_group()
    _owned = False


def _active() -> bool:
    """Whether this process trains as one rank of a group that setup() made (a plain run never is)."""
    return _owned and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if _active():
        dist.barrier()


def mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over the ranks, in place."""
    if _active():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place."""
    if _active():
        dist.all_reduce(tensor)
    return tensor


def agree(elapsed: float, *flags: bool) -> tuple[float, ...]:
    """The largest clock and each flag raised on any rank, in one float64 all-reduce:
    what every rank acts on this step."""
    if not _active():
        return (elapsed, *flags)
    tensor = torch.tensor([elapsed, *map(float, flags)], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    first, *rest = tensor.tolist()
    return (first, *(value > 0 for value in rest))


def unanswered_ranks(wait: float = 3.0) -> list[int]:
    """After a collective timed out: the ranks that do not say within ``wait`` seconds that they are alive
    ([] if unknown).

    Every rank that timed out marks itself in the rendezvous store (torchrun's agent holds it, so
    it answers while a rank is stopped) and looks for the others' marks; a stopped or hung rank
    never writes its own.
    """
    try:
        store = dist.distributed_c10d._get_default_store()
        prefix = f"makemore/alive/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        store.set(prefix + str(rank()), "1")
        deadline = time.monotonic() + wait
        while True:
            missing = [r for r in range(world_size()) if not store.check([prefix + str(r)])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the store itself is gone: the caller says what it knows
        return []


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not _active():
        return [obj]
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects
