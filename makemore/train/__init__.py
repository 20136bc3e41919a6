"""One training loop for every model, recipes as small config objects, and batched evaluation.

The ``lecture`` recipe is lecture 5's run, step for step: ``torch.manual_seed(42)`` before init,
minibatches from ``torch.randint`` on the same random stream, SGD at lr 0.1 then 0.01 from step
150,000. The batches come from a private generator that starts where the global one stood after
init, so the run draws exactly the lecture's batches without touching global state, and its state
goes into checkpoints for an exact resume.
"""

import json
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from makemore.kernels import cross_entropy

from .. import checkpoint, data
from ..data import IGNORE_INDEX, DataError, Vocab
from ..models import MLP, ConvWaveNet, HierarchicalWaveNet, MLPConfig, NeuralBigram, NGram, WaveNetConfig

CHECKPOINT = "ckpt.pt"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"


@dataclass
class TrainConfig:
    data: str = "names"  # a registered data set or a path
    kind: str = "auto"  # "lines" (one item per line), "stream" (one text), "auto": the registry's, else lines
    model: str = "wavenet"  # one of MODELS
    block_size: int = 8
    n_embd: int = 24
    n_hidden: int = 128
    max_steps: int = 200_000
    batch_size: int = 32
    lr: float = 0.1
    lr_decay_step: int = 150_000  # from this step on, lr is lr_after_decay
    lr_after_decay: float = 0.01
    seq_len: int = 64  # stream data and sequence models: targets per training sequence
    seed: int = 42
    loss: str = "fused"  # "fused": kernels.cross_entropy; "torch": F.cross_entropy
    device: str = "cpu"
    log_every: int = 1000
    checkpoint_every: int = 10_000


RECIPES = {
    # Lecture 5's log, row by row (val loss the lecture reports).
    "lecture": TrainConfig(),  # hierarchical, n_embd 24, n_hidden 128, 76,579 params: val 1.993
    "mlp3": TrainConfig(model="mlp", block_size=3, n_embd=10, n_hidden=200),  # 12K params: val 2.105
    "mlp8": TrainConfig(model="mlp", block_size=8, n_embd=10, n_hidden=200),  # 22K params: val 2.027
    "wavenet22k": TrainConfig(n_embd=10, n_hidden=68),  # 22K params, with the 3-D BatchNorm: val 2.022
    # Lectures 1 and 2: counts, and the bigram as one linear layer.
    "bigram": TrainConfig(model="bigram", block_size=1, max_steps=0),
    "trigram": TrainConfig(model="trigram", block_size=2, max_steps=0),
    "bigram-nn": TrainConfig(model="bigram-nn", block_size=1, max_steps=0),
}

MODELS = ("bigram", "trigram", "bigram-nn", "mlp", "wavenet", "conv-wavenet")
SEQUENCE_MODELS = ("conv-wavenet",)


class SGD(torch.optim.Optimizer):
    """Plain SGD written as the lecture writes it, ``p += -lr * grad``.

    torch.optim.SGD computes ``p.add_(grad, alpha=-lr)``, which rounds differently (a fused
    multiply-add), so its run drifts from the lecture's by float noise from the second step on.
    """

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p += -group["lr"] * p.grad


def build_model(config: TrainConfig, vocab_size: int) -> torch.nn.Module:
    if config.model == "bigram":
        return NGram(vocab_size, order=2)
    if config.model == "trigram":
        return NGram(vocab_size, order=3)
    if config.model == "bigram-nn":
        return NeuralBigram(vocab_size)
    if config.model == "mlp":
        return MLP(MLPConfig(vocab_size, config.block_size, config.n_embd, config.n_hidden))
    if config.model == "wavenet":
        return HierarchicalWaveNet(WaveNetConfig(vocab_size, config.block_size, config.n_embd, config.n_hidden))
    if config.model == "conv-wavenet":
        return ConvWaveNet(WaveNetConfig(vocab_size, config.block_size, config.n_embd, config.n_hidden))
    raise ValueError(f"unknown model {config.model!r}; choose one of {', '.join(MODELS)}")


def loss_function(name: str):
    if name == "fused":
        return cross_entropy
    if name == "torch":
        return F.cross_entropy
    raise ValueError(f"unknown loss {name!r}; choose 'fused' or 'torch'")


class Corpus:
    """The data a run trains and evaluates on, in the shapes its model takes.

    Window models take (X (N, block_size), Y (N,)). Sequence models (the convolutional WaveNet)
    take whole sequences (S (N, block_size + T - 1), targets (N, T)), targets IGNORE_INDEX where
    there is nothing to predict; both see the same population of (window, next token) pairs.
    """

    def __init__(self, config: TrainConfig, vocab: Vocab | None = None):
        path, self.kind = data.resolve(config.data, kind=config.kind)
        self.block_size = config.block_size
        self.seq_len = config.seq_len
        self.sequences = config.model in SEQUENCE_MODELS
        if self.kind == "lines":
            items = data.read_lines(path, vocab)
            self.vocab = vocab or Vocab.for_lines(items)
            self.items = dict(zip(("train", "val", "test"), data.lecture_split(items, seed=config.seed)))
            shape = data.padded_sequences if self.sequences else data.build_windows
            self.tensors = {split: shape(split_items, self.vocab, config.block_size, where=str(path)) for split, split_items in self.items.items()}
            self.lengths = {split: torch.tensor([len(item) for item in split_items]) for split, split_items in self.items.items()}
            self.max_len = max(len(item) for item in items)
        else:
            text = data.read_text(path)
            self.vocab = vocab or Vocab.for_stream(text)
            ids = self.vocab.encode(text, where=str(path))
            self.streams = dict(zip(("train", "val"), data.stream_split(ids)))
            self.max_len = config.seq_len
            span = self.block_size + (self.seq_len if self.sequences else 1)
            for split, split_ids in self.streams.items():
                if len(split_ids) < span:
                    raise DataError(
                        f"{path}: the {split} split has {len(split_ids)} tokens, fewer than a window of {span}; "
                        "use a shorter context or more text"
                    )

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.tensors) if self.kind == "lines" else tuple(self.streams)

    def training_batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch: ``batch_size`` windows, or ``batch_size`` whole items or text windows for sequence models."""
        if self.kind == "lines":
            inputs, targets = self.tensors["train"]
            ix = torch.randint(0, inputs.shape[0], (batch_size,), generator=generator)
            if not self.sequences:
                return inputs[ix], targets[ix]
            longest = int(self.lengths["train"][ix].max())  # trim the columns no item of this batch reaches
            return inputs[ix, : self.block_size + longest], targets[ix, : longest + 1]
        span = self.block_size + (self.seq_len if self.sequences else 1)
        window = data.random_windows(self.streams["train"], batch_size, span, generator)
        if not self.sequences:
            return window[:, :-1], window[:, -1]
        return window[:, :-1], window[:, self.block_size :]

    def all_windows(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every window X (N, block_size) of ``split`` and its next token Y (N,), for window models."""
        if self.kind == "lines":
            return self.tensors[split]
        windows = self.streams[split].unfold(0, self.block_size + 1, 1)  # a view: no copy of the text per window
        return windows[:, :-1], windows[:, -1]

    def eval_batches(self, split: str, windows_per_batch: int):
        """(inputs, targets) batches that together predict every target of ``split`` exactly once."""
        if not self.sequences:
            X, Y = self.all_windows(split)
            for i in range(0, X.shape[0], windows_per_batch):
                yield X[i : i + windows_per_batch], Y[i : i + windows_per_batch]
            return
        if self.kind == "lines":
            S, targets = self.tensors[split]
            rows = max(1, windows_per_batch // targets.shape[1])
            for i in range(0, S.shape[0], rows):
                yield S[i : i + rows], targets[i : i + rows]
            return
        # A stream in consecutive chunks of seq_len targets; the last chunk's overhang is ignored.
        ids, B, T = self.streams[split], self.block_size, self.seq_len
        n_targets = len(ids) - B
        n_chunks = -(-n_targets // T)
        padded = torch.cat([ids, ids.new_zeros(n_chunks * T + B - len(ids))])
        chunks = padded.unfold(0, T + B, T)  # (n_chunks, T + B)
        position = torch.arange(n_chunks)[:, None] * T + torch.arange(T)  # index of each target among the split's
        targets = chunks[:, B:].masked_fill(position >= n_targets, IGNORE_INDEX)
        rows = max(1, windows_per_batch // T)
        for i in range(0, n_chunks, rows):
            yield chunks[i : i + rows, :-1], targets[i : i + rows]


@torch.no_grad()
def evaluate(model, corpus: Corpus, loss_fn=cross_entropy, splits=None, batch_size: int = 8192, device="cpu") -> dict:
    """Mean loss per split in eval mode (BatchNorm on running statistics), in bounded memory."""
    was_training = model.training
    model.eval()
    result = {}
    for split in splits or corpus.splits:
        total, count = 0.0, 0
        for inputs, targets in corpus.eval_batches(split, batch_size):
            logits = model(inputs.to(device))
            targets = targets.to(device)
            total += float(loss_fn(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((targets != IGNORE_INDEX).sum())
        result[split] = total / count
    model.train(was_training)
    return result


def learning_rate(config: TrainConfig, step: int) -> float:
    return config.lr if step < config.lr_decay_step else config.lr_after_decay


def train(config: TrainConfig, out_dir: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train, checkpoint into ``out_dir``, evaluate; return the final losses."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = checkpoint.load(out_dir / CHECKPOINT) if resume else None
    corpus = Corpus(config, vocab=Vocab(state["vocab"]) if state else None)
    loss_fn = loss_function(config.loss)

    torch.manual_seed(config.seed)
    model = build_model(config, len(corpus.vocab))
    generator = torch.Generator().set_state(torch.get_rng_state())  # the stream the lecture's randint draws from
    model.to(config.device)
    fits = hasattr(model, "fit")  # count models and the lecture's full-batch bigram: no minibatch steps
    optimizer = None if fits else SGD(model.parameters(), lr=config.lr)
    losses = torch.zeros(config.max_steps)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start = state["step"]
        kept = state["losses"][: min(start, config.max_steps)]
        losses[: len(kept)] = kept
        _truncate_metrics(out_dir / METRICS, start)

    def save_checkpoint(step: int) -> None:
        checkpoint.save(
            {
                "config": asdict(config),
                "kind": corpus.kind,
                "vocab": corpus.vocab.chars,
                "max_len": corpus.max_len,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict() if optimizer is not None else {},
                "generator": generator.get_state(),
                "step": step,
                "losses": losses[:step].clone(),
            },
            out_dir / CHECKPOINT,
        )

    if fits:
        X, Y = corpus.all_windows("train")  # the whole split at once: count models and full-batch descent
        model.fit(X.to(config.device), Y.to(config.device))
    else:
        _sgd_loop(model, optimizer, corpus, config, loss_fn, generator, losses, start, out_dir, save_checkpoint, progress)
    save_checkpoint(max(start, config.max_steps))

    result = evaluate(model, corpus, loss_fn, device=config.device)
    with open(out_dir / METRICS, "a") as f:
        f.write(json.dumps({"step": config.max_steps, "eval": result}) + "\n")
    if config.max_steps:
        plot_losses(losses[: config.max_steps], out_dir / LOSS_PLOT)
    return result


def _sgd_loop(model, optimizer, corpus, config, loss_fn, generator, losses, start, out_dir, save_checkpoint, progress):
    model.train()
    bar = tqdm(range(start, config.max_steps), initial=start, total=config.max_steps, disable=not progress, mininterval=1.0, unit="step")
    tick, tick_step = time.perf_counter(), start
    with open(out_dir / METRICS, "a") as metrics:
        for step in bar:
            inputs, targets = (t.to(config.device) for t in corpus.training_batch(config.batch_size, generator))
            if corpus.sequences:  # padding must stay out of BatchNorm's statistics
                logits = model(inputs, valid=targets != IGNORE_INDEX)
            else:
                logits = model(inputs)
            loss = loss_fn(logits, targets, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            optimizer.step()
            losses[step] = loss.detach()

            done = step + 1
            if done % config.log_every == 0 or done == config.max_steps:
                now = time.perf_counter()
                bucket = losses[max(tick_step, done - config.log_every) : done]
                record = {"step": done, "loss": bucket.mean().item(), "lr": learning_rate(config, step), "steps_per_s": (done - tick_step) / (now - tick)}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                tick, tick_step = now, done
            if done % config.checkpoint_every == 0 and done < config.max_steps:
                save_checkpoint(done)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step``, so a resumed run's log reads as one uninterrupted run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step and "eval" not in json.loads(line)]
    path.write_text("".join(line + "\n" for line in kept))


def plot_losses(losses: torch.Tensor, path: Path, bucket: int = 1000) -> None:
    """The lecture's plot: log10 of the training loss averaged over buckets of 1000 steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(losses) // bucket * bucket
    curve = losses[:n].log10().view(-1, bucket).mean(1) if n else losses.log10()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(torch.arange(len(curve)) * (bucket if n else 1), curve)
    ax.set_xlabel("step")
    ax.set_ylabel(f"log10 training loss (mean of {bucket} steps)" if n else "log10 training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def resumed_config(out_dir: Path, **overrides) -> TrainConfig:
    """The configuration a run in ``out_dir`` was started with, with ``overrides`` (None: keep)."""
    return config_with(TrainConfig(**checkpoint.load(Path(out_dir) / CHECKPOINT)["config"]), **overrides)


def config_with(base: TrainConfig, **overrides) -> TrainConfig:
    """``base`` with the given fields replaced, ignoring overrides that are None."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown training options: {', '.join(sorted(unknown))}")
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})

