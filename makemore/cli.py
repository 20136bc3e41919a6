"""The ``makemore`` command: train, sample, eval.

``train``'s flags are generated from the config dataclasses (TrainConfig and the models'
configs): each field is one flag with its type, choices and help. Bad input ends in one line on
stderr (what, where, how to fix) and exit code 2, never a traceback.
"""

import argparse
import json
import math
import os
import re
import shlex
import sys
import tempfile
from dataclasses import MISSING, fields
from pathlib import Path

import torch

from . import checkpoint
from .checkpoint import CheckpointError
from .data import DataError, Vocab, load_source
from .device import check_device, resolve_device
from .models import MODELS, build_model
from .sample import sample_items, sample_text
from .train import CHECKPOINT, RECIPES, TrainConfig, distributed, evaluate, make_configs, train
from .train.config import check_new_run, flag, model_fields, model_help
from .train.loop import LostPeerError, final_record
from .train.run import BEST
from .train.signals import Interrupted, Stopped

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
# Samples are drawn as one batch and text one character a step: bounds that keep a typo from filling
# memory or running for hours.
MAX_SAMPLES = 100_000
MAX_LENGTH = 1_000_000
CHECKPOINTS = {"last": CHECKPOINT, "best": BEST}  # --checkpoint: the run directory's two checkpoints
# What a resumed run may change: how long it goes on and how it reports, never what it trains.
RESUMABLE = (
    "max_steps",
    "max_seconds",
    "device",
    "dtype",
    "compile",
    "compile_mode",
    "dist_timeout",
    "eval_interval",
    "eval_iters",
    "patience",
    "eval_max_tokens",
    "log_interval",
    "checkpoint_interval",
    "checkpoint_seconds",
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except Stopped as e:  # after its checkpoint: say how to go on
        if distributed.is_main_process():
            print(
                f"makemore train: {e}; checkpoint {args.out_dir / CHECKPOINT} written; "
                f"continue with: {_resume_command(args.out_dir)}",
                file=sys.stderr,
            )
        return 128 + e.signum
    except Interrupted as e:
        if distributed.is_main_process():
            print(
                f"makemore train: {e}; {args.out_dir / CHECKPOINT} keeps the last checkpoint written, if any: "
                f"continue with: {_resume_command(args.out_dir)}",
                file=sys.stderr,
            )
        return 128 + e.signum
    except LostPeerError as e:
        print(f"makemore {args.command}: error: {_one_line(e)}", file=sys.stderr)
        # Exit now, past the interpreter's shutdown: the broken gloo group's C++ destructors can abort the
        # process there ("terminate called without an active exception"), and torchrun would then report this
        # rank, not the lost one, as the root cause. The lock and the checkpoint are settled by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_BAD_INPUT)
    except (DataError, CheckpointError, ValueError, TypeError, FloatingPointError) as e:
        print(f"makemore {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # a path that cannot be read or written (permissions, a full disk), wherever it was met
        where = f"{e.filename}: " if e.filename else ""
        print(f"makemore {args.command}: error: {where}{e.strerror or _one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (RuntimeError, MemoryError) as e:
        message = _out_of_memory(e, args.command)
        if not message:
            raise  # a bug: its traceback is what it takes to fix it
        print(f"makemore {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(
            f"makemore {args.command}: interrupted; the last checkpoint is kept, continue with --resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def _resume_command(out: Path) -> str:
    """The command that continues this run: the same launcher, ``--out`` and ``--resume``
    (the checkpoint holds the settings)."""
    tail = f"makemore train --out {shlex.quote(str(out))} --resume"
    if not distributed.launched():
        return tail
    nodes, per_node = (
        int(os.environ.get("GROUP_WORLD_SIZE", 1)),
        os.environ.get("LOCAL_WORLD_SIZE", distributed.world_size()),
    )
    if nodes == 1:
        return f"torchrun --standalone --nproc-per-node {per_node} -m {tail}"
    return f"on each of the {nodes} nodes, your torchrun command with -m {tail}"


def _one_line(e: BaseException) -> str:
    """The message's first line: torch's own errors can carry a C++ stack trace after it."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# What makes each command's tensors large, for the out-of-memory message.
MEMORY_FLAGS = {
    "train": "--batch-size, --block-size, --seq-len, --n-embd, --n-hidden, --n-skip or --eval-iters",
    "sample": "-n or --length",
    "eval": "--max-tokens",
}


def _out_of_memory(e: BaseException, command: str) -> str:
    """The one-line message for an allocation that failed (a huge size), or "" for any other error."""
    text = str(e)
    if not (
        isinstance(e, (MemoryError, torch.OutOfMemoryError))
        or "can't allocate memory" in text
        or "out of memory" in text
    ):
        return ""
    size = ""
    if found := re.search(r"allocate (\d+) bytes", text):  # the CPU allocator's wording
        n, unit = float(found[1]), 0
        while n >= 1024 and unit < 6:
            n, unit = n / 1024, unit + 1
        size = f" (tried to allocate {n:.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB')[unit]})"
    elif found := re.search(r"[Tt]ried to allocate ([\d.]+ [KMGTP]?i?B)", text):  # CUDA's
        size = f" (tried to allocate {found[1]})"
    return f"out of memory{size}; lower {MEMORY_FLAGS[command]}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="makemore", description="Character-level language models, from the bigram to the hierarchical WaveNet."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train a model; prints its losses and a few samples")
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="lecture",
        help="named settings to start from; flags override them (default: lecture)",
    )
    p.add_argument(
        "--out", type=Path, help="directory for the checkpoint, metrics.jsonl and loss.png (default: runs/RECIPE)"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="auto",
        help="continue the run in --out exactly where its checkpoint stopped; "
        "--resume auto: if it has one, else start it (for torchrun --max-restarts)",
    )
    p.add_argument("--force", action="store_true", help="start over even if --out already holds a checkpoint")
    p.add_argument(
        "--samples", type=int, default=20, help="names to print after training (text: 500 characters; 0: none)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    settings = p.add_argument_group("training settings [default; the recipes that set another]")
    for f in fields(TrainConfig):
        _add_flag(settings, f, _defaults_text(f))
    settings = p.add_argument_group(
        "model settings (the models that take each, with their defaults) [the recipes that set another]"
    )
    for f in model_fields().values():
        _add_flag(settings, f, _model_defaults_text(f.name), help=model_help(f.name))
    p.set_defaults(run=_train)

    p = commands.add_parser("sample", help="sample from a trained model")
    p.add_argument("--out", type=Path, required=True, help="the training run's directory")
    _add_checkpoint_flag(p)
    p.add_argument("-n", "--num-samples", type=int, default=20, help="names to sample (line data)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--unique", action="store_true", help="skip samples that occur in the training split")
    p.add_argument("--length", type=int, default=500, help="characters to generate (text data)")
    p.add_argument("--prompt", default="", help="text data: the text to continue; line data: the start of every item")
    p.set_defaults(run=_sample)

    p = commands.add_parser("eval", help="loss of a trained model on each split")
    p.add_argument("--out", type=Path, required=True, help="the training run's directory")
    _add_checkpoint_flag(p)
    p.add_argument("--data", help="evaluate on this data set or file instead of the one trained on (same split rules)")
    p.add_argument("--max-tokens", type=int, help="targets per split at most (default: the run's --eval-max-tokens)")
    p.add_argument("--json", action="store_true", help='print {"train": ..., "val": ..., "test": ...}')
    p.set_defaults(run=_eval)
    return parser


def _add_checkpoint_flag(p) -> None:
    p.add_argument(
        "--checkpoint",
        choices=CHECKPOINTS,
        default="last",
        help=f"last: the weights training ended with ({CHECKPOINT}); "
        f"best: the best val estimate's ({BEST}, kept by runs with --eval-interval) (default: last)",
    )


def _recipes_setting(name: str) -> str:
    return ", ".join(f"{recipe}: {settings[name]}" for recipe, settings in RECIPES.items() if name in settings)


def _defaults_text(f) -> str:
    recipes = _recipes_setting(f.name)
    return ("unset" if f.default is None else f"{f.default}") + (f"; {recipes}" if recipes else "")


def _model_defaults_text(name: str) -> str:
    takers = []
    for model, (_, config_cls) in MODELS.items():
        for g in fields(config_cls):
            if g.name == name:
                takers.append(f"{model} {g.default if g.default is not MISSING else '(required)'}")
    recipes = _recipes_setting(name)
    return f"models: {', '.join(takers)}" + (f"] [{recipes}" if recipes else "")


def _add_flag(group, f, defaults: str, help: str | None = None) -> None:
    text = f"{help or f.metadata['help']} [{defaults}]".replace("%", "%%")
    kwargs = dict(dest=f.name, default=None, help=text)
    if f.type is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = f.metadata.get("type", f.type)
        kwargs["metavar"] = f.name.upper()
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
            kwargs.pop("metavar")
    group.add_argument(flag(f.name), **kwargs)


def _given_settings(args) -> dict:
    names = [f.name for f in fields(TrainConfig)] + list(model_fields())
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _train(args) -> int:
    out = args.out_dir = args.out or Path("runs") / args.recipe
    given = _given_settings(args)
    if args.resume not in (None, True, "auto"):
        raise ValueError(f"--resume takes no value or auto, got {args.resume!r}")
    if args.resume == "auto":  # the same command starts the run and, after a restart, continues it
        args.resume = (out / CHECKPOINT).exists() or None
    if args.resume:
        state = checkpoint.load(out / CHECKPOINT)
        stored = {**state["config"], **state["model_config"]}
        # A lower --lr continues a run that diverged from its last good checkpoint (training stops
        # before saving a diverged state, and the same rate would diverge again at the same step).
        lowered = "lr" in given and given["lr"] <= state["config"]["lr"]
        changed = sorted(
            flag(name)
            for name, value in given.items()
            if name not in RESUMABLE and not (name == "lr" and lowered) and value != stored.get(name)
        )
        if changed:
            raise ValueError(
                f"{', '.join(changed)} cannot change when resuming; "
                f"only {', '.join(flag(n) for n in RESUMABLE)} can, and --lr be lowered"
            )
        settings = {**state["config"], **{k: v for k, v in state["model_config"].items() if k != "vocab_size"}, **given}
    else:
        if not 0 <= args.samples <= MAX_SAMPLES:
            raise ValueError(f"--samples must be in [0, {MAX_SAMPLES:,}], got {args.samples}")
        if (out / CHECKPOINT).exists() and not args.force:
            raise CheckpointError(
                f"{out / CHECKPOINT} already exists; pass --resume to continue that run or --force to start over"
            )
        settings = {**RECIPES[args.recipe], **given}
    config, model_config = make_configs(settings)
    if not args.resume:
        check_new_run(config, model_config)
    check_device(resolve_device(config.device))
    _check_out_dir(out)
    result = train(config, model_config, out, resume=bool(args.resume), progress=not args.quiet)
    if not distributed.is_main_process():
        return 0  # under torchrun, rank 0 prints the losses and the samples
    print(_losses(result))
    best = (final_record(out) or {}).get("best")
    if best:
        print(f"best.pt (step {best['step']:,}, {best['time']:.0f} s): {_losses(best)}")
    if args.samples:
        model, state = load_model(out)
        print("\n".join(_samples(model, state, args.samples, seed=config.seed)))
    return 0


def _sample(args) -> int:
    if not 1 <= args.num_samples <= MAX_SAMPLES:
        raise ValueError(f"-n must be in [1, {MAX_SAMPLES:,}], got {args.num_samples}")
    if not 0 <= args.length <= MAX_LENGTH:
        raise ValueError(f"--length must be in [0, {MAX_LENGTH:,}], got {args.length}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ValueError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2^63), got {args.seed}")
    model, state = load_model(args.out, args.checkpoint)
    samples = _samples(
        model,
        state,
        args.num_samples,
        seed=args.seed,
        temperature=args.temperature,
        top_k=args.top_k,
        unique=args.unique,
        length=args.length,
        prompt=args.prompt,
    )
    print("\n".join(samples))
    return 0


def _eval(args) -> int:
    if args.max_tokens is not None and not 1 <= args.max_tokens < 2**63:
        raise ValueError(f"--max-tokens must be in [1, 2^63), got {args.max_tokens}")
    model, state = load_model(args.out, args.checkpoint)
    config = TrainConfig(**state["config"])
    source = load_source(args.data or config.data, config.kind, seed=config.seed, vocab=Vocab(state["vocab"]))
    result = evaluate(model, source, max_tokens=config.eval_max_tokens if args.max_tokens is None else args.max_tokens)
    print(json.dumps(result) if args.json else _losses(result))
    return 0


def _losses(result: dict) -> str:
    """ "train 1.7690 val 1.9937 test 1.9853": the splits' losses of a result (other keys skipped)."""
    return " ".join(f"{split} {result[split]:.4f}" for split in ("train", "val", "test") if split in result)


def _check_out_dir(out: Path) -> None:
    """--out is a directory this process can write into (made if missing), checked before any data is read."""
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a directory; pass a directory (it is made if missing)")
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(
            dir=out
        ).close()  # the directory's mode alone does not tell (root, ACLs, read-only mounts)
    except OSError as e:
        raise ValueError(
            f"--out {out}: cannot write there ({e.strerror or _one_line(e)}); choose a directory you can write"
        ) from None


def load_model(out_dir: Path, checkpoint_name: str = "last"):
    """The trained model in ``out_dir`` (eval mode, on the CPU) and its checkpoint: the last weights or the best."""
    if Path(out_dir).is_file():  # most likely the checkpoint itself: name its directory
        raise ValueError(
            f"--out {out_dir} is a file; pass the training run's directory (the one that holds {CHECKPOINT})"
        )
    path = Path(out_dir) / CHECKPOINTS[checkpoint_name]
    if checkpoint_name == "best" and not path.is_file() and (Path(out_dir) / CHECKPOINT).is_file():
        raise CheckpointError(
            f"{path}: this run kept no best checkpoint (it trained without --eval-interval); use --checkpoint last"
        )
    state = checkpoint.load(path)
    settings = {**state["config"], **state["model_config"]}
    vocab_size = settings.pop("vocab_size")
    config, model_config = make_configs(settings, vocab_size=vocab_size)
    model = build_model(config.model, model_config)
    checkpoint.load_weights(model, state["model"], path)
    return model.eval(), state


def _samples(model, state, n, *, seed, temperature=1.0, top_k=None, unique=False, length=500, prompt="") -> list[str]:
    vocab = Vocab(state["vocab"])
    generator = torch.Generator().manual_seed(seed)
    if state["kind"] == "stream":
        return [sample_text(model, vocab, length, prompt, temperature=temperature, top_k=top_k, generator=generator)]
    exclude = _training_items(state) if unique else frozenset()
    return sample_items(
        model,
        vocab,
        n,
        state["max_len"],
        temperature=temperature,
        top_k=top_k,
        generator=generator,
        exclude=exclude,
        prompt=prompt,
    )


def _training_items(state):
    """The training split's items for ``in`` tests: hashes in a tensor, not a set of str
    (10 million names would take 1 GB)."""
    config = TrainConfig(**state["config"])
    return load_source(config.data, config.kind, seed=config.seed, vocab=Vocab(state["vocab"])).item_set("train")
