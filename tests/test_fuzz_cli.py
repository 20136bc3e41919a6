"""Fuzzed command lines: every bad argument of ``makemore train / sample / eval`` ends in exactly
one line on stderr that names its flag, and exit code 2, before any training starts; every good
one reaches training with exactly the values given.

``main`` runs in this process with ``train`` replaced by a stand-in that records its arguments
and stops (nothing trains here), except for a few cases that must get into the real training
setup (an allocation that cannot succeed) or need a checkpoint (a bigram fitted by counting, in
about a second). The tables of bad values below are written from the documented rules, not read
from the config dataclasses, so they test those dataclasses rather than repeat them.
"""

import contextlib
import io
import os
import re
import shutil
from dataclasses import fields
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from makemore import cli
from makemore.models import MODELS
from makemore.train import RECIPES, TrainConfig
from makemore.train.config import model_fields

FUZZ = settings(derandomize=True, deadline=None, max_examples=150)
HUGE = st.integers(2**63, 2**200) | st.integers(-(2**200), -(2**63) - 1)  # beyond int64: torch's tensor sizes and seeds
NON_FINITE = st.sampled_from(["nan", "inf", "-inf", "1e400", "-1e400", "NaN", "Infinity"])  # 1e400 parses as inf


class Trained(Exception):
    """Raised by the stand-in for ``train``: the command line got as far as training."""


def invoke(*argv) -> tuple[object, str, mock.Mock, bool]:
    """``makemore argv`` in this process with training stubbed out:
    (exit code or "trained", stderr, the stub, whether argparse refused it)."""
    err = io.StringIO()
    stub = mock.Mock(side_effect=Trained)
    by_argparse = False
    with (
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
        mock.patch.object(cli, "train", stub),
    ):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own errors: usage, then one error line
            code, by_argparse = e.code, True
        except Trained:
            code = "trained"
    return code, err.getvalue(), stub, by_argparse


def names_flag(line: str, flag: str) -> bool:
    """``flag`` appears in ``line`` as a whole flag (--n, not the start of --n-embd)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", line) is not None


def assert_refused(command: str, flag: str, argv) -> str:
    """``makemore command argv`` exits with 2 before training, with one error line naming ``flag``; that line."""
    code, err, stub, by_argparse = invoke(command, *argv)
    assert code == 2, (argv, code, err)
    assert not stub.called, f"{argv} reached training"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    # argparse's type, choice and missing-argument errors print the usage first, then one error line.
    assert lines[1:] == [] or (by_argparse and lines[0].startswith("usage: makemore")), (argv, err)
    line = lines[-1]
    assert line.startswith(f"makemore {command}: error: "), line
    assert names_flag(line, flag), (flag, line)
    return line


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """A run directory for the stubbed trainings (hypothesis runs many examples in one function-scoped test)."""
    return tmp_path_factory.mktemp("fuzz") / "run"


# --- train: a bad value of any setting ----------------------------------------------------------

POSITIVE = st.integers(max_value=0) | HUGE  # sizes, counts, intervals: >= 1
NON_NEGATIVE = st.integers(max_value=-1) | HUGE


def _floats(low, high, *, low_ok=True, high_ok=True):
    """Text of finite floats below ``low`` or above ``high`` (or equal to a bound that is not ``_ok``),
    and non-finite ones."""

    def bad(x):
        return x < low or (x == low and not low_ok) or (high is not None and (x > high or (x == high and not high_ok)))

    outside = st.floats(max_value=low, allow_nan=False, allow_infinity=False)
    if high is not None:
        outside |= st.floats(min_value=high, allow_nan=False, allow_infinity=False)
    return outside.filter(bad).map(repr) | NON_FINITE  # filter: -0.0 equals 0.0, a valid lower bound


def _not_in(choices):
    return st.text(st.characters(codec="ascii", categories=["L", "N", "Pd"]), max_size=12).filter(
        lambda s: s not in choices
    )


# Flag name (as a field) -> (the model that has it, or None for TrainConfig's, bad values as text).
# The rules, as the README and --help state them.
INVALID = {
    "seq_len": (None, POSITIVE),
    "batch_size": (None, POSITIVE),
    "grad_accum": (None, POSITIVE),
    "eval_iters": (None, POSITIVE),
    "eval_max_tokens": (None, POSITIVE),
    "log_interval": (None, POSITIVE),
    "checkpoint_interval": (None, POSITIVE),
    "max_steps": (None, NON_NEGATIVE | st.integers(10_000_001, 2**62)),  # each step's loss is kept: at most 10 million
    "eval_interval": (None, NON_NEGATIVE),
    "patience": (None, NON_NEGATIVE),
    "seed": (None, st.integers(max_value=-1) | st.integers(2**63 - 1)),
    "lr": (None, _floats(0, None, low_ok=False)),
    "min_lr": (None, _floats(0, None)),
    "max_seconds": (None, _floats(0, None)),
    "checkpoint_seconds": (None, _floats(0, None)),
    "dist_timeout": (None, _floats(0, None, low_ok=False)),
    "weight_decay": (None, _floats(0, None)),
    "grad_clip": (None, _floats(0, None)),
    "decay_at": (None, _floats(0, 1)),
    "warmup": (None, _floats(0, 1)),
    "beta1": (None, _floats(0, 1, high_ok=False)),  # 1 itself is refused: AdamW divides by 1 - beta^t
    "beta2": (None, _floats(0, 1, high_ok=False)),
    "device": (
        None,
        st.text(st.characters(codec="ascii", categories=["L", "N", "P"]), max_size=10).filter(
            lambda s: not re.fullmatch(r"auto|(cpu|cuda|mps)(:\d+)?", s)
        ),
    ),
    "kind": (None, _not_in(("auto", "lines", "stream"))),
    "layout": (None, _not_in(("windows", "sequences"))),
    "model": (None, _not_in(tuple(MODELS))),
    "optimizer": (None, _not_in(("sgd", "adamw"))),
    "schedule": (None, _not_in(("step", "cosine"))),
    "dtype": (None, _not_in(("auto", "float32", "bfloat16"))),
    "compile_mode": (None, _not_in(("default", "reduce-overhead", "max-autotune"))),
    "block_size": (
        "wavenet",
        st.integers(max_value=1) | st.integers(3, 2**62).filter(lambda b: b & (b - 1)) | HUGE,
    ),  # a power of two >= 2
    "n_embd": ("mlp", POSITIVE),
    "n_hidden": ("wavenet", POSITIVE),
    "n_skip": ("gated", POSITIVE),
    "n_levels": ("gated", st.integers(max_value=0) | st.integers(17, 2**62) | HUGE),  # 1..16
    "stacks": ("gated", st.integers(max_value=0) | st.integers(17, 2**62) | HUGE),  # 1..16
    "dropout": ("gated", _floats(0, 1, high_ok=False)),  # [0, 1)
    "order": ("wavenet", _not_in(("conv", "conv1d", "windows"))),
    "n": ("ngram", st.integers(max_value=1) | st.integers(6, 2**62) | HUGE),  # 27^n counts: n <= 5 for names
    "smoothing": ("ngram", _floats(0, None)),
    "n_layer": ("transformer", st.integers(max_value=0)),
    "n_head": ("transformer", st.integers(max_value=0)),
}
# Flags with no numeric or named value to get wrong: --data is checked when read (test_cli.py),
# the booleans take no value.
NOT_FUZZED = {"data", "compile", "fused", "tie_weights"}


def test_every_setting_has_bad_values_to_try():
    """A new setting must say here what a bad value of it is (or why it has none)."""
    settings_ = {f.name for f in fields(TrainConfig)} | set(model_fields())
    assert settings_ == set(INVALID) | NOT_FUZZED


def _bad_setting():
    return st.sampled_from(sorted(INVALID)).flatmap(lambda name: st.tuples(st.just(name), INVALID[name][1].map(str)))


@FUZZ
@given(bad=_bad_setting(), recipe=st.sampled_from(sorted(RECIPES)))
def test_a_bad_setting_is_one_line_naming_its_flag(out, bad, recipe):
    name, value = bad
    model = INVALID[name][0]
    flag = "--" + name.replace("_", "-")
    # Model settings go with a model that has them (and the default recipe, whose settings are the
    # WaveNet's); a training setting goes with any recipe.
    argv = ["--out", out, *(["--model", model] if model else ["--recipe", recipe]), f"{flag}={value}"]
    assert_refused("train", flag, argv)


# Values that are right on their own and wrong together, or wrong for one model.
@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--block-size", "6"], "--block-size"),  # the tree halves the window: a power of two
        (["--block-size", "1"], "--block-size"),
        (["--model", "mlp", "--block-size", "0"], "--block-size"),
        (["--model", "mlp", "--order", "conv"], "--order"),  # a setting the model does not have
        (["--model", "gated", "--order", "conv1d"], "--order"),
        (["--model", "ngram", "--n-embd", "8"], "--n-embd"),
        (["--batch-size", "1"], "--batch-size"),  # BatchNorm over one window: nan (0 when fused)
        (["--recipe", "fast", "--batch-size", "1"], "--batch-size"),
        (["--model", "mlp", "--batch-size", "1"], "--batch-size"),
        (["--layout", "sequences", "--batch-size", "1", "--seq-len", "1"], "--batch-size"),
        (["--lr", "0.005", "--min-lr", "0.01"], "--min-lr"),  # a floor above the peak: the rate would jump up
        (["--patience", "3"], "--patience"),  # counts estimates: needs --eval-interval
        (["--recipe", "fast", "--weight-decay", "100"], "--weight-decay"),  # lr x wd >= 1 flips the weights
        (["--max-steps", "10000000000"], "--max-steps"),
        (["--seed", str(2**64)], "--seed"),
        (["--device", "cuda:x"], "--device"),
        (["--device", f"cuda:{torch.cuda.device_count()}"], "--device"),  # one past the last GPU, none here
        (["--model", "ngram", "--n", "7"], "--n"),  # 27^7 counts, 41 GB
        (["--model", "gated", "--stacks", "1000000000000"], "--stacks"),  # would build layers until memory runs out
        (["--recipe", "nope"], "--recipe"),
        (["--model", "lstm"], "--model"),
        (["--compile-mode", "reduce-overhead"], "--compile-mode"),  # without --compile it would do nothing
        (["--dist-timeout", "0"], "--dist-timeout"),
        (["--lr", "abc"], "--lr"),
        (["--batch-size", "1.5"], "--batch-size"),
        (["--max-seconds", "1e400"], "--max-seconds"),
        (["--samples", "-1"], "--samples"),
        (["--samples", "10000000"], "--samples"),
    ],
)
def test_bad_train_arguments(out, argv, flag):
    assert_refused("train", flag, ["--out", out, *argv])


def test_a_bad_setting_is_refused_when_resuming_too(tmp_path, checkpoints):
    """What a resumed run may change is checked like a new run's settings; the rest may not change at all."""
    run = tmp_path / "run"
    shutil.copytree(checkpoints / "lines", run)
    assert "must be a finite number" in assert_refused(
        "train", "--max-seconds", ["--out", run, "--resume", "--max-seconds", "nan"]
    )
    assert "cannot change when resuming" in assert_refused("train", "--lr", ["--out", run, "--resume", "--lr", "nan"])


# --- train: the output directory ----------------------------------------------------------------


def test_out_is_a_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"")
    assert "is a file" in assert_refused("train", "--out", ["--out", path, "--max-steps", "1"])


def test_out_under_a_file(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    line = assert_refused("train", "--out", ["--out", tmp_path / "file" / "run", "--max-steps", "1"])
    assert "cannot write there (Not a directory)" in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_under_a_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        for out in (locked / "run", locked):
            assert "cannot write there (Permission denied)" in assert_refused(
                "train", "--out", ["--out", out, "--max-steps", "1"]
            )
    finally:
        locked.chmod(0o700)


def test_out_that_cannot_be_written_even_by_root(tmp_path, monkeypatch):
    """The same check where the directory's mode does not tell (root, ACLs, read-only mounts): it tries a file."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run"))

    monkeypatch.setattr(cli.tempfile, "TemporaryFile", refuse)
    assert "cannot write there (Permission denied)" in assert_refused(
        "train", "--out", ["--out", tmp_path / "run", "--max-steps", "1"]
    )


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(13, "Permission denied", "/runs/x/ckpt.pt"),
        IsADirectoryError(21, "Is a directory", "/runs/x/metrics.jsonl"),
        NotADirectoryError(20, "Not a directory", "/runs/x/loss.png"),
        OSError(28, "No space left on device", "/runs/x/ckpt.pt"),
    ],
)
def test_os_errors_during_a_run_are_one_line(tmp_path, error):
    """Whatever path fails once training runs (the directory was fine when checked), one line names it."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), mock.patch.object(cli, "train", side_effect=error):
        assert cli.main(["train", "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    assert err.getvalue() == f"makemore train: error: {error.filename}: {error.strerror}\n"


# --- out of memory ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--batch-size", str(2**50)],  # 8 PiB of indices: beyond any address space, so it fails wherever it runs
        ["--n-embd", str(2**45)],  # the embedding table, as large
    ],
)
def test_a_size_too_large_for_memory_is_one_line(tmp_path, capsys, flags):
    """Sizes within int64 that no machine can allocate: the real setup runs until the allocation fails."""
    assert (
        cli.main(["train", "--out", str(tmp_path / "run"), "--max-steps", "1", "--quiet", "--samples", "0", *flags])
        == 2
    )
    err = capsys.readouterr().err
    assert re.fullmatch(
        r"makemore train: error: out of memory \(tried to allocate [\d.]+ PiB\); lower --batch-size, .*\n", err
    ), err


def test_cuda_out_of_memory_is_one_line(tmp_path):
    error = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.1 GiB\nof which ..."
    )
    err = io.StringIO()
    with contextlib.redirect_stderr(err), mock.patch.object(cli, "train", side_effect=error):
        assert cli.main(["train", "--out", str(tmp_path / "run")]) == 2
    assert err.getvalue().startswith(
        "makemore train: error: out of memory (tried to allocate 20.00 GiB); lower --batch-size"
    )
    assert err.getvalue().count("\n") == 1


def test_other_runtime_errors_keep_their_traceback(tmp_path):
    """Only known failures become one line: a bug elsewhere must still show where it is."""
    with (
        mock.patch.object(cli, "train", side_effect=RuntimeError("shape mismatch")),
        pytest.raises(RuntimeError, match="shape mismatch"),
    ):
        cli.main(["train", "--out", str(tmp_path / "run")])


def test_multi_line_errors_are_cut_to_their_first_line(tmp_path):
    """torch's ValueErrors carry a C++ stack trace after the message."""
    error = ValueError(
        "randn(): argument 'size' failed to unpack the object\nException raised from THPUtils_unpackLong\nframe #0: ..."
    )
    err = io.StringIO()
    with contextlib.redirect_stderr(err), mock.patch.object(cli, "train", side_effect=error):
        assert cli.main(["train", "--out", str(tmp_path / "run")]) == 2
    assert err.getvalue() == "makemore train: error: randn(): argument 'size' failed to unpack the object\n"


# --- train: good values get through unchanged ---------------------------------------------------

VALID_TRAIN = {
    "batch_size": st.integers(2, 2**20),
    "grad_accum": st.integers(1, 64),
    "max_steps": st.integers(0, 10_000_000),
    "max_seconds": st.floats(0, 1e6),
    "eval_interval": st.integers(0, 10**9),
    "eval_iters": st.integers(1, 1000),
    "eval_max_tokens": st.integers(1, 2**62),
    "log_interval": st.integers(1, 10**9),
    "checkpoint_interval": st.integers(1, 10**9),
    "seed": st.integers(0, 2**63 - 2),
    "decay_at": st.floats(0, 1),
    "warmup": st.floats(0, 1),
    "beta1": st.floats(0, 1, exclude_max=True),
    "beta2": st.floats(0, 1, exclude_max=True),
    "grad_clip": st.floats(0, 1e3),
    "schedule": st.sampled_from(["step", "cosine"]),
    "dtype": st.sampled_from(["float32", "bfloat16"]),
    "device": st.sampled_from(["cpu", "cpu:0"]),
}
VALID_MODEL = {
    "wavenet": {
        "block_size": st.sampled_from([2, 4, 8, 64, 1024]),
        "n_embd": st.integers(1, 4096),
        "n_hidden": st.integers(1, 4096),
        "order": st.sampled_from(["conv", "conv1d", "windows"]),
    },
    "mlp": {"block_size": st.integers(1, 4096), "n_embd": st.integers(1, 4096), "n_hidden": st.integers(1, 4096)},
    "gated": {
        "n_embd": st.integers(1, 512),
        "n_hidden": st.integers(1, 512),
        "n_skip": st.integers(1, 512),
        "n_levels": st.integers(1, 16),
        "stacks": st.integers(1, 16),
        "dropout": st.floats(0, 1, exclude_max=True),
        "order": st.sampled_from(["conv", "windows"]),
    },
    "ngram": {"n": st.integers(2, 5), "smoothing": st.floats(0, 1e6)},
    "neural-bigram": {},
}


@st.composite
def good_settings(draw):
    model = draw(st.sampled_from(sorted(VALID_MODEL)))
    chosen = draw(st.dictionaries(st.sampled_from(sorted(VALID_TRAIN)), st.just(None), max_size=6))
    settings_ = {name: draw(VALID_TRAIN[name]) for name in sorted(chosen)}
    for name, values in VALID_MODEL[model].items():
        if draw(st.booleans()):
            settings_[name] = draw(values)
    settings_["optimizer"] = draw(st.sampled_from(["sgd", "adamw"]))
    settings_["lr"] = draw(st.floats(1e-6, 10))
    settings_["min_lr"] = settings_["lr"] * draw(st.floats(0, 1))  # at most the peak
    if settings_["optimizer"] == "adamw":
        settings_["weight_decay"] = draw(st.floats(0, 0.99)) / settings_["lr"]  # lr x wd < 1
    return model, settings_


@settings(derandomize=True, deadline=None, max_examples=60)
@given(choice=good_settings())
def test_good_settings_reach_training_unchanged(out, choice):
    """No value is dropped, rounded, clamped or sent to another setting on its way to the trainer."""
    model, given_settings = choice
    argv = ["--model", model, "--force"]
    for name, value in given_settings.items():
        argv += ["--" + name.replace("_", "-"), repr(value) if isinstance(value, float) else str(value)]
    code, err, stub, _ = invoke("train", "--out", out, *argv)
    assert code == "trained", err
    config, model_config, out_dir = stub.call_args.args
    assert out_dir == out and config.model == model
    for name, value in given_settings.items():
        assert (
            getattr(model_config if hasattr(model_config, name) and not hasattr(config, name) else config, name)
            == value
        ), name


# --- sample and eval ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Bigrams fitted by counting (no training steps): on names (line data) and on a small text (stream data)."""
    root = tmp_path_factory.mktemp("fitted")
    text = root / "text.txt"
    text.write_text("ROMEO: But soft, what light through yonder window breaks?\n" * 40)
    common = ["--recipe", "bigram", "--quiet", "--samples", "0", "--eval-max-tokens", "2000"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["train", "--out", str(root / "lines"), *common]) == 0
        assert cli.main(["train", "--out", str(root / "stream"), "--data", str(text), "--kind", "stream", *common]) == 0
    return root


INVALID_SAMPLE = {
    "-n": st.integers(max_value=0) | st.integers(100_001) | HUGE,
    "--length": st.integers(max_value=-1) | st.integers(1_000_001) | HUGE,
    "--temperature": _floats(0, None, low_ok=False),
    "--top-k": st.integers(max_value=0),
    "--seed": st.integers(max_value=-1) | st.integers(2**63),
}


@FUZZ
@given(flag=st.sampled_from(sorted(INVALID_SAMPLE)), data=st.data())
def test_a_bad_sample_argument_is_one_line_naming_its_flag(out, flag, data):
    """Checked before the checkpoint is read: the directory here has none, and the error still names the flag."""
    value = data.draw(INVALID_SAMPLE[flag])
    assert_refused("sample", flag, ["--out", out, f"{flag}={value}"])


@settings(derandomize=True, deadline=None, max_examples=25)
@given(
    n=st.integers(1, 30),
    seed=st.integers(0, 2**63 - 1),
    temperature=st.floats(1e-3, 1e3),
    top_k=st.none() | st.integers(1, 2**100),
    length=st.integers(0, 100),
    stream=st.booleans(),
)
def test_good_sample_arguments_sample(checkpoints, n, seed, temperature, top_k, length, stream):
    argv = [
        "sample",
        "--out",
        checkpoints / ("stream" if stream else "lines"),
        "-n",
        n,
        "--seed",
        seed,
        "--temperature",
        repr(temperature),
        "--length",
        length,
    ]
    if top_k is not None:
        argv += ["--top-k", top_k]
    printed, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(err):
        assert cli.main([str(a) for a in argv]) == 0
    assert err.getvalue() == ""
    if stream:
        assert len(printed.getvalue()) == length + 1  # the text and print's newline
    else:
        # At most n names, one a line; exactly n once test_sample_prints_as_many_names_as_asked passes.
        assert len(printed.getvalue().split()) <= n and printed.getvalue().endswith("\n")


def test_sample_prints_as_many_names_as_asked(checkpoints):
    """At a high temperature the bigram often ends a name at once; those empty draws must be replaced."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert (
            cli.main(["sample", "--out", str(checkpoints / "lines"), "-n", "8", "--seed", "1", "--temperature", "6"])
            == 0
        )
    assert len(printed.getvalue().splitlines()) == 8


@pytest.mark.parametrize("value", ["0", "-5", str(2**63), "abc"])
def test_bad_eval_max_tokens(out, value):
    """0 used to fall back silently to the run's own bound (`or`)."""
    assert_refused("eval", "--max-tokens", ["--out", out, "--max-tokens", value])


@pytest.mark.parametrize("max_tokens, expected_splits", [(1, 3), (10**18, 3)])
def test_good_eval_max_tokens(checkpoints, max_tokens, expected_splits):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["eval", "--out", str(checkpoints / "lines"), "--max-tokens", str(max_tokens), "--json"]) == 0
    assert printed.getvalue().count(":") == expected_splits


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_and_eval_need_a_run_directory(tmp_path, checkpoints, command):
    assert "no checkpoint here; train one first" in assert_refused(
        command, "--out", ["--out", tmp_path]
    )  # names it: "--out DIR"
    assert "is a file; pass the training run's directory" in assert_refused(
        command, "--out", ["--out", checkpoints / "lines" / "ckpt.pt"]
    )
    assert_refused(command, "--out", [])  # required
