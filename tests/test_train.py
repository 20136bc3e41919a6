import json
from dataclasses import replace

import lecture_reference as lecture
import pytest
import torch

from makemore import checkpoint, data
from makemore import device as device_module
from makemore.device import resolve_device, resolve_dtype
from makemore.models import WaveNet, WaveNetConfig, build_model
from makemore.train import CHECKPOINT, METRICS, RECIPES, loop, make_configs, saver, train
from makemore.train.optim import learning_rate

# A tiny normalisation-free model: trains in seconds, and its gradients need no batch statistics.
TINY_GATED = dict(model="gated", n_embd=8, n_hidden=8, n_skip=8, n_levels=2)
ADAMW = dict(optimizer="adamw", lr=1e-2)  # a high rate, for tiny models and short runs


def quick(tmp_path, **settings):
    """Configs for a short run on names, and its output directory."""
    settings = {"data": "names", "log_interval": 50, "checkpoint_interval": 10_000, "dtype": "float32", **settings}
    return (*make_configs(settings), tmp_path / "run")


def test_lecture_recipe_is_the_lectures_notebook_step_for_step(tmp_path, names, names_vocab):
    """Same seed, same batches, same arithmetic: bit-identical weights after 300 steps.

    The recipe decays at 75% of its steps (step 150,000 of 200,000); cut to 300 steps, it must not decay at 225.
    """
    config, model_config, out = quick(tmp_path, **RECIPES["lecture"], max_steps=300, decay_at=1.0)
    train(config, model_config, out, progress=False)
    ours = checkpoint.load(out / CHECKPOINT)

    X, Y = data.LineSource(names, names_vocab).windows("train", 8)
    torch.manual_seed(42)
    theirs = lecture.hierarchical(27)
    lossi = lecture.train_steps(theirs, X.long(), Y.long(), 300)
    assert torch.equal(ours["losses"], torch.tensor(lossi))
    model = WaveNet(WaveNetConfig())
    model.load_state_dict(ours["model"])
    for ours_p, theirs_p in zip(model.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(ours_p, theirs_p)
    # The running statistics too: the lecture's eval-mode losses (1.769 / 1.993) are computed with them.
    theirs_bn = [layer for layer in theirs.layers if isinstance(layer, lecture.BatchNorm1d)]
    for block, bn in zip(model.blocks, theirs_bn, strict=True):
        assert torch.equal(block.bn.running_mean, bn.running_mean.flatten())
        assert torch.equal(block.bn.running_var, bn.running_var.flatten())


def test_the_lecture_schedule_decays_at_step_150000():
    config, _ = make_configs(RECIPES["lecture"])
    steps = (0, 149_999, 150_000, 199_999)
    assert [learning_rate(config, s / config.max_steps) for s in steps] == [0.1, 0.1, 0.01, 0.01]


def test_cosine_warms_up_then_decays_to_the_floor():
    config, _ = make_configs(dict(schedule="cosine", lr=1.0, min_lr=0.1, warmup=0.1))
    lrs = [learning_rate(config, p) for p in (0.0, 0.05, 0.1, 0.55, 1.0)]
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.55, 0.1])


def test_short_run_learns_and_logs(tmp_path):
    config, model_config, out = quick(tmp_path, max_steps=1500, eval_interval=500, eval_iters=2)
    result = train(config, model_config, out, progress=False)
    assert set(result) == {"train", "val", "test"}
    assert result["val"] < 2.45  # log(27) = 3.30 at init; the lecture's model passes 2.4 by step ~1000
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(50, 1501, 50))
    assert all(r["tokens_per_s"] > 0 and r["time"] > 0 for r in logged)
    assert [r["step"] for r in records if "estimate" in r] == [0, 500, 1000, 1500]  # and the last weights, as nanoGPT
    assert records[-1]["final"] == result and records[-1]["best"]["step"] in (500, 1000, 1500)
    assert (out / "loss.png").stat().st_size > 0


@pytest.mark.parametrize(
    "settings",
    [{}, dict(TINY_GATED, dropout=0.3, **ADAMW)],
    ids=["wavenet", "gated-dropout"],
)
def test_resume_continues_exactly(tmp_path, settings):
    """The batch stream, and the global random state that dropout draws from, continue where they stopped."""
    # A constant learning rate: cut at step 100, the first run's schedule would otherwise decay earlier.
    config, model_config, straight = quick(tmp_path, **settings, max_steps=200, checkpoint_interval=100, decay_at=1.0)
    train(config, model_config, straight, progress=False)
    split = tmp_path / "split"
    first, _ = make_configs({**vars(config), "max_steps": 100})
    train(first, model_config, split, progress=False)
    train(config, model_config, split, resume=True, progress=False)
    a, b = checkpoint.load(straight / CHECKPOINT), checkpoint.load(split / CHECKPOINT)
    assert a["step"] == b["step"] == 200
    assert torch.equal(a["losses"], b["losses"])
    assert torch.equal(a["generator"], b["generator"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    records = [json.loads(line) for line in (split / METRICS).read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [50, 100, 150, 200]


def test_a_time_budget_stops_training_at_the_first_step_that_reaches_it(tmp_path, monkeypatch):
    """A fake training clock that advances 0.25 s per step: a 1 s budget is 4 steps,
    and the cosine schedule follows it."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(loop, "clock", lambda: 0.25 * next(ticks))  # read at each step's start and end: 0.25 s a step
    budget = dict(max_steps=10**6, max_seconds=1.0, schedule="cosine")
    config, model_config, out = quick(tmp_path, **budget, **ADAMW, log_interval=1, eval_max_tokens=1000)
    train(config, model_config, out, progress=False)
    state = checkpoint.load(out / CHECKPOINT)
    assert state["step"] == 4 and state["elapsed"] == 1.0 and state["times"].tolist() == [0.25, 0.5, 0.75, 1.0]
    lrs = [json.loads(line)["lr"] for line in (out / METRICS).read_text().splitlines() if "lr" in json.loads(line)]
    assert lrs == [learning_rate(config, t) for t in (0.0, 0.25, 0.5, 0.75)]


def loop_batches(config, model_config, steps: int):
    """The model the loop builds and the batches it draws, step by step (the loop's seeding, rank 0)."""
    source = data.load_source(config.data, config.kind, seed=config.seed)
    torch.manual_seed(config.seed)
    model = build_model(config.model, replace(model_config, vocab_size=len(source.vocab)))
    generator = torch.Generator().set_state(torch.get_rng_state())
    batches = [
        [
            source.batch("train", config.batch_size, config.layout, model.receptive_field, generator)
            for _ in range(config.grad_accum)
        ]
        for _ in range(steps)
    ]
    return model, batches


# The gated model (no batch statistics) on windows (one target per row): the mean of the micro-batches' mean
# losses is the mean over their concatenation, so accumulation must equal one step on the large batch.
ACCUM = dict(TINY_GATED, n_levels=3, batch_size=8, grad_accum=4, max_steps=3, decay_at=1.0)
ACCUM.update(log_interval=1, eval_max_tokens=1000)


def test_gradient_accumulation_equals_the_step_on_the_concatenated_batch(tmp_path):
    """3 SGD steps of 4 micro-batches of 8 rows against 3 steps on the 32 rows at once, in float64.

    Tolerance: the loop sums float32 micro-batch gradients where the reference reduces 32 rows in one
    float64 pass: float32 rounding (~1e-7 relative) times lr; a micro-batch dropped or counted twice moves
    the weights by ~lr x gradient = 1e-2.
    """
    config, model_config, out = quick(tmp_path, **ACCUM)
    train(config, model_config, out, progress=False)
    ours = checkpoint.load(out / CHECKPOINT)["model"]
    model, steps = loop_batches(config, model_config, 3)
    model.double()
    for micro in steps:
        _, loss = model(torch.cat([b.idx for b in micro]), torch.cat([b.targets for b in micro]))
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= config.lr * p.grad
                p.grad = None
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ours[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_clipping_equals_clip_grad_norm_of_the_accumulated_gradient(tmp_path):
    """With --grad-clip 0.02 (well below the gradient's norm, so it acts): the accumulated gradient of all
    micro-batches is scaled to norm 0.02 before the step, as torch.nn.utils.clip_grad_norm_ would."""
    config, model_config, out = quick(tmp_path, **ACCUM, grad_clip=0.02)
    train(config, model_config, out, progress=False)
    ours = checkpoint.load(out / CHECKPOINT)["model"]
    model, steps = loop_batches(config, model_config, 3)
    model.double()
    norms = []
    for micro in steps:
        _, loss = model(torch.cat([b.idx for b in micro]), torch.cat([b.targets for b in micro]))
        loss.backward()
        norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))  # the global norm, written out
        norms.append(float(norm))
        with torch.no_grad():
            for p in model.parameters():
                p -= config.lr * p.grad * min(1.0, config.grad_clip / (float(norm) + 1e-6))
                p.grad = None
    assert min(norms) > 10 * config.grad_clip  # the clip acted at every step
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ours[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_small_recipe_really_compiles_on_the_cpu(tmp_path, capfd):
    """--compile through torch.compile (inductor, C++ on the CPU), no mock: it trains and says nothing of falling back.
    The compiled steps match eager ones to float32 rounding (inductor fuses and reorders)."""
    settings = dict(TINY_GATED, **ADAMW, batch_size=16, max_steps=5, decay_at=1.0, eval_max_tokens=1000)
    config, model_config, out = quick(tmp_path, **settings, compile=True)
    train(config, model_config, out, progress=False)
    assert "--compile failed" not in capfd.readouterr().err
    eager_config, _, eager_out = quick(tmp_path / "eager", **settings)
    train(eager_config, model_config, eager_out, progress=False)
    compiled, eager = checkpoint.load(out / CHECKPOINT), checkpoint.load(eager_out / CHECKPOINT)
    torch.testing.assert_close(compiled["losses"], eager["losses"], rtol=1e-4, atol=1e-5)
    for name, value in eager["model"].items():
        torch.testing.assert_close(compiled["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_the_device_and_dtype_a_run_used_are_recorded(tmp_path):
    """bfloat16 training runs (autocast, float32 master weights) and says so in metrics.jsonl and the checkpoint."""
    settings = dict(TINY_GATED, **ADAMW, max_steps=50, dtype="bfloat16", eval_max_tokens=1000)
    config, model_config, out = quick(tmp_path, **settings)
    result = train(config, model_config, out, progress=False)
    state = checkpoint.load(out / CHECKPOINT)
    assert (state["device"], state["dtype"], state["world_size"]) == ("cpu", "bfloat16", 1)
    assert all(v.dtype == torch.float32 for v in state["model"].values())
    first = json.loads((out / METRICS).read_text().splitlines()[0])
    assert first == {"step": 0, "run": {"device": "cpu", "dtype": "bfloat16", "world_size": 1}}
    assert result["val"] < 3.0  # ln 27 = 3.30: it learned


def test_auto_picks_the_gpu_and_bf16_where_the_hardware_has_them(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cuda:1") == torch.device("cuda", 1)
    for flags, expected in (
        ({"avx512_bf16", "avx512f"}, torch.bfloat16),
        ({"amx_bf16"}, torch.bfloat16),
        ({"avx2", "avx512f"}, torch.float32),
    ):
        monkeypatch.setattr(device_module, "cpu_flags", lambda flags=flags: flags)
        assert resolve_dtype("auto", torch.device("cpu")) == expected
        assert resolve_dtype("float32", torch.device("cpu")) == torch.float32  # a dtype named is kept
    assert resolve_dtype("auto", torch.device("mps")) == torch.float32
    assert make_configs(RECIPES["lecture"])[0].dtype == "float32"  # the notebook's arithmetic on every machine


@pytest.mark.parametrize(
    "settings",
    [
        dict(model="ngram", n=2, max_steps=0),
        dict(model="ngram", n=3, max_steps=0),
        dict(model="neural-bigram", max_steps=0),
        dict(model="mlp", block_size=3, n_embd=10, n_hidden=200, max_steps=300),
        dict(model="mlp", block_size=3, n_embd=10, n_hidden=200, max_steps=300, layout="sequences", batch_size=8),
        dict(max_steps=300, layout="sequences", batch_size=8, optimizer="adamw", lr=1e-2, fused=True),
        dict(max_steps=300, order="windows", grad_accum=2, grad_clip=1.0, optimizer="adamw", lr=1e-2),
    ],
    ids="bigram trigram bigram-nn mlp mlp-sequences wavenet-sequences-fused wavenet-windows-accum-clip".split(),
)
def test_every_model_and_layout_trains_and_evaluates(tmp_path, settings):
    config, model_config, out = quick(tmp_path, **settings)
    result = train(config, model_config, out, progress=False)
    assert 1.5 < result["val"] < 2.8


def test_bigram_counts_reach_the_lectures_loss(tmp_path):
    config, model_config, out = quick(tmp_path, **RECIPES["bigram"])
    result = train(config, model_config, out, progress=False)
    assert result["train"] == pytest.approx(2.45, abs=0.02)  # lecture 1: about 2.45 on all words


def test_stream_data_trains_on_random_windows(tmp_path):
    path = tmp_path / "stream.txt"
    path.write_text("the quick brown fox. jumps over the lazy dog.\n" * 300)
    config, model_config, out = quick(tmp_path, data=str(path), kind="stream", n_embd=8, n_hidden=32, max_steps=600)
    result = train(config, model_config, out, progress=False)
    assert set(result) == {"train", "val"}
    assert result["val"] < 1.0  # the text repeats: a 8-character context nearly determines the next one


def test_wavenet_trains_on_a_stream_with_a_long_context_through_the_convolution(tmp_path):
    path = tmp_path / "stream.txt"
    path.write_text("the quick brown fox. jumps over the lazy dog.\n" * 400)
    stream = dict(data=str(path), kind="stream", layout="sequences", block_size=1024, seq_len=32, batch_size=4)
    config, model_config, out = quick(tmp_path, **stream, **ADAMW, n_embd=8, n_hidden=16, max_steps=100)
    result = train(config, model_config, out, progress=False)
    assert result["val"] < 2.0


@pytest.mark.parametrize("recipe", ["shakespeare-60s", "shakespeare-3m", "shakespeare-15m"])
def test_shakespeare_recipes_train_the_gated_model_on_long_sequences(tmp_path, recipe):
    """Each recipe as written, shrunk in its time budget and depth; the text's final 10% is the val split."""
    path = tmp_path / "stream.txt"
    path.write_text("the quick brown fox. jumps over the lazy dog.\n" * 400)
    shrunk = dict(n_levels=4, seq_len=256, max_seconds=0.0, max_steps=60)
    settings = dict(RECIPES[recipe], data=str(path), kind="stream", **shrunk)
    config, model_config, out = quick(tmp_path, **settings)
    assert (config.model, config.layout, config.optimizer) == ("gated", "sequences", "adamw")
    result = train(config, model_config, out, progress=False)
    assert result["val"] < 1.0  # the text repeats: a 16-character context nearly determines the next one


def test_sequence_and_window_evaluation_agree(tmp_path, names, names_vocab):
    """The final evaluation uses whole names; the lecture's per-window loss over the same pairs is the same number."""
    config, model_config, out = quick(tmp_path, max_steps=50)
    result = train(config, model_config, out, progress=False)
    model = WaveNet(model_config)
    model.load_state_dict(checkpoint.load(out / CHECKPOINT)["model"])
    model.eval()
    X, Y = data.LineSource(names, names_vocab).windows("val", 8)
    with torch.no_grad():
        _, loss = model(X.long(), Y.long()[:, None])
    assert float(loss) == pytest.approx(result["val"], abs=1e-5)


def test_checkpoints_are_also_written_by_wall_clock(tmp_path, monkeypatch):
    """--checkpoint-seconds 2.5 with a fake wall clock that advances 1 s each time it is read (once a step to ask
    whether a save is due, once per save to restart the count): saves at steps 3, 6 and 9, then the final one."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(saver.time, "monotonic", lambda: float(next(ticks)))
    saved = []
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda state, path: (saved.append(state["step"]), real_save(state, path)))
    settings = dict(TINY_GATED, max_steps=10, checkpoint_seconds=2.5, eval_max_tokens=1000)
    config, model_config, out = quick(tmp_path, **settings, checkpoint_interval=10**6)
    train(config, model_config, out, progress=False)
    assert saved == [3, 6, 9, 10]
