"""The ``makemore`` command: train, sample, eval.

Bad input ends in one line on stderr (what, where, how to fix) and exit code 2, never a traceback.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from . import checkpoint, data, train as training
from .checkpoint import CheckpointError
from .data import DataError, Vocab, read_lines
from .sample import sample_items, sample_text
from .train import CHECKPOINT, MODELS, RECIPES, TrainConfig

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (DataError, CheckpointError, ValueError) as e:
        print(f"makemore {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"makemore {args.command}: interrupted; the last checkpoint is kept, continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="makemore", description="Character-level language models, from the bigram to the hierarchical WaveNet.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train a model; prints its losses and a few samples")
    p.add_argument("--data", help="a registered data set (names, tinyshakespeare) or a path to a text file, one item per line (default: the recipe's, names)")
    p.add_argument("--kind", choices=("auto", "lines", "stream"), help="lines: one item per line; stream: one text (default: the data set's, lines for a path)")
    p.add_argument("--out", type=Path, required=True, help="directory for the checkpoint, metrics.jsonl and loss.png")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="lecture", help="starting configuration (default: lecture, the 76,579-parameter WaveNet)")
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--block-size", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--n-hidden", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-decay-step", type=int)
    p.add_argument("--seq-len", type=int, help="targets per training sequence for sequence models")
    p.add_argument("--seed", type=int)
    p.add_argument("--loss", choices=("fused", "torch"), help="fused: kernels.cross_entropy (default); torch: F.cross_entropy")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where its checkpoint stopped")
    p.add_argument("--force", action="store_true", help="start over even if --out already holds a checkpoint")
    p.add_argument("--samples", type=int, default=20, help="samples to print after training (default 20)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_train)

    p = commands.add_parser("sample", help="sample from a trained model")
    p.add_argument("--out", type=Path, required=True, help="the training run's directory")
    p.add_argument("-n", "--num-samples", type=int, default=20)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--unique", action="store_true", help="skip samples that occur in the training data")
    p.add_argument("--length", type=int, default=500, help="characters to generate, for models of text streams")
    p.add_argument("--prompt", default="", help="text to continue, for models of text streams")
    p.set_defaults(run=_sample)

    p = commands.add_parser("eval", help="loss of a trained model on each split")
    p.add_argument("--out", type=Path, required=True, help="the training run's directory")
    p.add_argument("--data", help="evaluate on this data set or file instead of the one trained on (same split rules)")
    p.add_argument("--json", action="store_true", help='print {"train": ..., "val": ..., "test": ...}')
    p.set_defaults(run=_eval)
    return parser


def _train(args) -> int:
    overrides = dict(
        data=args.data, kind=args.kind, model=args.model, block_size=args.block_size, n_embd=args.n_embd, n_hidden=args.n_hidden,
        max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, lr_decay_step=args.lr_decay_step,
        seq_len=args.seq_len, seed=args.seed, loss=args.loss, device=args.device, checkpoint_every=args.checkpoint_every,
    )  # fmt: skip
    if args.resume:
        config = training.resumed_config(args.out, max_steps=args.max_steps, device=args.device)
    else:
        if (args.out / CHECKPOINT).exists() and not args.force:
            raise CheckpointError(f"{args.out / CHECKPOINT} already exists; pass --resume to continue that run or --force to start over")
        config = training.config_with(RECIPES[args.recipe], **overrides)
    _check_positive(config)
    result = training.train(config, args.out, resume=args.resume, progress=not args.quiet)
    print(" ".join(f"{split} {loss:.4f}" for split, loss in result.items()))
    if args.samples:
        model, state = _load_model(args.out)
        print("\n".join(_samples(model, state, args.samples, seed=config.seed)))
    return 0


def _sample(args) -> int:
    if args.num_samples < 1:
        raise ValueError(f"-n must be >= 1, got {args.num_samples}")
    model, state = _load_model(args.out)
    print(
        "\n".join(
            _samples(
                model, state, args.num_samples, seed=args.seed, temperature=args.temperature, top_k=args.top_k,
                unique=args.unique, length=args.length, prompt=args.prompt,
            )
        )
    )  # fmt: skip
    return 0


def _eval(args) -> int:
    model, state = _load_model(args.out)
    config = training.config_with(TrainConfig(**state["config"]), data=args.data, device="cpu")
    corpus = training.Corpus(config, vocab=Vocab(state["vocab"]))
    result = training.evaluate(model, corpus, training.loss_function(config.loss))
    print(json.dumps(result) if args.json else " ".join(f"{split} {loss:.4f}" for split, loss in result.items()))
    return 0


def _load_model(out_dir: Path):
    state = checkpoint.load(out_dir / CHECKPOINT)
    config = TrainConfig(**state["config"])
    model = training.build_model(config, len(state["vocab"]))
    model.load_state_dict(state["model"])
    return model.eval(), state


def _samples(model, state, n, *, seed, temperature=1.0, top_k=None, unique=False, length=500, prompt="") -> list[str]:
    vocab = Vocab(state["vocab"])
    generator = torch.Generator().manual_seed(seed)
    if state["kind"] == "stream":
        return [sample_text(model, vocab, length, prompt, temperature=temperature, top_k=top_k, generator=generator)]
    exclude = frozenset(_training_items(state)) if unique else frozenset()
    return sample_items(model, vocab, n, state["max_len"], temperature=temperature, top_k=top_k, generator=generator, exclude=exclude)


def _training_items(state) -> list[str]:
    config = TrainConfig(**state["config"])
    path, _ = data.resolve(config.data, kind=config.kind)
    return data.lecture_split(read_lines(path), seed=config.seed)[0]


def _check_positive(config: TrainConfig) -> None:
    for name in ("block_size", "n_embd", "n_hidden", "batch_size", "seq_len", "log_every", "checkpoint_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.max_steps < 0:
        raise ValueError(f"--max-steps must be >= 0, got {config.max_steps}")
