"""The makemore command, end to end; bad input ends in one line on stderr and exit code 2."""

import json
import re
import subprocess
import sys
from dataclasses import fields

import pytest

from makemore.cli import main
from makemore.data import lecture_split

# A quick run of the fast recipe: a small batch, stopped by a step count (--max-steps) rather than the clock.
FAST = "train --recipe fast --batch-size 64 --max-seconds 0".split()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--data", "names", "--out", str(out), "--max-steps", "300", "--quiet", "--samples", "0"]) == 0
    return out


def run(*argv):
    """``python -m makemore ...`` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "makemore", *map(str, argv)], capture_output=True, text=True, timeout=300
    )


def test_stream_data_trains_and_samples_without_a_prompt(tmp_path, capsys):
    """tinyshakespeare ships with the package; a text model samples from an empty prompt."""
    out = tmp_path / "shakespeare"
    argv = "train --data tinyshakespeare --max-steps 20 --batch-size 8 --quiet".split() + ["--out", str(out)]
    assert main([*argv, "--samples", "1", "--eval-max-tokens", "2000"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("train ") and " val " in printed and len(printed.splitlines()[1:]) > 0
    assert main(["sample", "--out", str(out), "--length", "100"]) == 0
    assert len(capsys.readouterr().out) == 101  # 100 characters and print's newline
    assert main(["sample", "--out", str(out), "--length", "20", "--prompt", "ROMEO:"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_flags_come_from_the_configs():
    from makemore.cli import _parser

    helps = _parser()._subparsers._group_actions[0].choices["train"].format_help()
    for option in (
        "--optimizer {sgd,adamw}",
        "--max-seconds",
        "--eval-max-tokens",
        "--order {conv,conv1d,windows}",
        "--fused, --no-fused",
        "--grad-accum",
        "--compile, --no-compile",
    ):
        assert option in helps, option


def test_train_prints_losses_and_samples(tmp_path):
    result = run(
        "train", "--data", "names", "--out", tmp_path / "run", "--max-steps", "200", "--quiet", "--samples", "5"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("train ") and " val " in lines[0] and " test " in lines[0]
    assert len(lines) == 6 and all(line.isalpha() and line.islower() for line in lines[1:])


def test_eval_json(trained, capsys):
    assert main(["eval", "--out", str(trained), "--json"]) == 0
    losses = json.loads(capsys.readouterr().out)
    assert set(losses) == {"train", "val", "test"} and all(1.5 < v < 3.0 for v in losses.values())


def test_sample_is_reproducible_and_can_skip_training_names(trained, capsys, names):
    assert main(["sample", "--out", str(trained), "-n", "30", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main(["sample", "--out", str(trained), "-n", "30", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first and len(first.splitlines()) == 30
    assert main(["sample", "--out", str(trained), "-n", "30", "--unique", "--top-k", "5", "--temperature", "0.8"]) == 0
    samples = capsys.readouterr().out.splitlines()
    training_names = set(lecture_split(names)[0])
    assert len(samples) == 30 and not set(samples) & training_names


def bad(capsys, *argv):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_missing_data_file(tmp_path, capsys):
    assert "nope.txt: no such file" in bad(capsys, "train", "--data", tmp_path / "nope.txt", "--out", tmp_path / "o")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "the file is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "items.txt:3: NUL byte"),
        (b"anna\n\xff\xfe\n", "items.txt:2: not valid UTF-8"),
        (b"anna\nst.john\n", "items.txt:2: 'st.john' contains '.'"),
    ],
)
def test_bad_training_files(tmp_path, capsys, content, message):
    path = tmp_path / "items.txt"
    path.write_bytes(content)
    assert message in bad(capsys, "train", "--data", path, "--out", tmp_path / "o", "--max-steps", "1")


def test_eval_on_data_with_a_character_the_model_never_saw(trained, tmp_path, capsys):
    path = tmp_path / "other.txt"
    path.write_text("anna\nzoë\n")
    assert "other.txt:2: character 'ë' is not in the model's vocabulary of 27" in bad(
        capsys, "eval", "--out", trained, "--data", path
    )


def test_sample_without_a_checkpoint(tmp_path, capsys):
    assert "no checkpoint here; train one first" in bad(capsys, "sample", "--out", tmp_path)


def test_training_never_overwrites_a_trained_model_silently(trained, capsys):
    assert "already exists; pass --resume" in bad(
        capsys, "train", "--data", "names", "--out", trained, "--max-steps", "1"
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--block-size", "6"], "--block-size must be a power of two"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--warmup", "2"], "--warmup must be in [0, 1]"),
        (["--model", "mlp", "--order", "conv"], "the mlp model has no --order"),
        (["--kind", "stream", "--data", "names", "--block-size", "1048576"], "fewer than a window of 1048577"),
    ],
)
def test_bad_options(tmp_path, capsys, flags, message):
    assert message in bad(capsys, "train", "--out", tmp_path / "o", "--max-steps", "1", *flags)


def test_bad_sample_options(trained, capsys):
    assert "--temperature must be a finite number > 0" in bad(capsys, "sample", "--out", trained, "--temperature", "0")


def test_console_script_errors_without_traceback(tmp_path):
    result = run("sample", "--out", tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert (
        result.stderr.strip() == f"makemore sample: error: {tmp_path / 'ckpt.pt'}: no checkpoint here; "
        f"train one first with `makemore train --out {tmp_path}`"
    )


def test_resume_continues_and_refuses_to_change_what_it_trains(tmp_path, capsys):
    out = tmp_path / "run"
    common = "--quiet --samples 0 --log-interval 10 --eval-max-tokens 5000".split() + ["--out", str(out)]
    assert main([*FAST, "--max-steps", "20", *common]) == 0
    assert main(["train", "--resume", "--max-steps", "30", *common]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [10, 20, 30]
    assert "--lr cannot change when resuming" in bad(capsys, "train", "--resume", "--lr", "0.5", *common)


def test_force_starts_a_fresh_log(tmp_path):
    out = tmp_path / "run"
    argv = FAST + "--max-steps 10 --quiet --samples 0 --log-interval 5 --eval-max-tokens 5000".split()
    argv += ["--out", str(out)]
    assert main(argv) == 0
    assert main([*argv, "--force"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 5, 10, 10] and "run" in records[0] and "final" in records[-1]


def test_compile_falls_back_to_eager_with_one_message(tmp_path, capsys, monkeypatch):
    import torch

    def refuse(model, *args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", refuse)
    argv = FAST + "--max-steps 5 --compile --quiet --samples 0 --eval-max-tokens 5000".split()
    argv += ["--out", str(tmp_path / "r")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "makemore: --compile failed (no compiler here); training without compilation" in err


def test_help_shows_each_flags_default_per_model_and_recipe():
    from makemore.cli import _parser

    helps = " ".join(_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "[models: mlp 3, wavenet 8" in helps  # --block-size: the lecture's WaveNet has 8, the MLP 3
    assert "[models: mlp 10, wavenet 24, gated 64" in helps  # --n-embd
    assert "[models: wavenet False]" in helps  # --fused: the WaveNet's alone
    assert "[0.1; fast: 0.02," in helps  # --lr: TrainConfig's default, then the recipes that set another
    assert "[auto; lecture: float32" in helps  # --dtype


def test_a_shared_model_flag_says_what_it_means_in_every_model_that_takes_it():
    from makemore.models import MODELS
    from makemore.train.config import model_fields, model_help

    for name in model_fields():
        takers = [model for model, (_, cls) in MODELS.items() if name in {f.name for f in fields(cls)}]
        named = re.findall(rf"(?:^|; )((?:{'|'.join(MODELS)})(?:, (?:{'|'.join(MODELS)}))*): \S", model_help(name))
        assert [m for group in named for m in group.split(", ")] == takers, name
    assert model_help("n_hidden").startswith("mlp: hidden layer width; wavenet: ")


def test_sample_with_a_prompt_on_line_data_starts_every_name_with_it(trained, capsys):
    assert main(["sample", "--out", str(trained), "-n", "30", "--prompt", "al"]) == 0
    samples = capsys.readouterr().out.splitlines()
    assert len(samples) == 30 and all(s.startswith("al") for s in samples) and any(len(s) > 2 for s in samples)
    assert "the boundary between items" in bad(capsys, "sample", "--out", str(trained), "--prompt", "a.b")
    assert "--prompt" in bad(capsys, "sample", "--out", str(trained), "--prompt", "Z")  # a character it never saw


def test_resume_auto_starts_a_run_then_continues_it(tmp_path, capsys):
    """The same command twice, as torchrun's restarts run it: fresh the first time, resumed the second."""
    out = tmp_path / "auto"
    common = "--quiet --samples 0 --log-interval 5 --eval-max-tokens 2000 --resume auto".split() + ["--out", str(out)]
    assert main([*FAST, "--max-steps", "10", *common]) == 0
    assert main([*FAST, "--max-steps", "20", *common]) == 0  # the same settings but the step count: allowed on resume
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20]
    assert [r["step"] for r in records if "run" in r] == [0, 10]
    assert "--resume takes no value or auto" in bad(capsys, "train", "--out", str(out), "--resume", "always")
