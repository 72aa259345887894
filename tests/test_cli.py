"""The `charlm` command through typer's CliRunner."""

import json

import pytest
import torch
from typer.testing import CliRunner

from charlm.checkpoint import make_checkpoint, save_checkpoint
from charlm.cli import app
from charlm.models import build_model
from charlm.tokenizer import CharTokenizer

runner = CliRunner()
TOK = CharTokenizer.fit("abcdefgh ABC\n")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "models" / "gpt.pt"
    torch.manual_seed(0)
    model = build_model("gpt", dict(vocab_size=TOK.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(path, make_checkpoint("gpt", model, TOK, {"train_seconds": 2.0, "steps": 10}))
    return path


def test_sample_streams_the_prompt_and_exactly_n_characters(ckpt):
    result = runner.invoke(app, ["sample", str(ckpt), "--prompt", "abc", "-n", "40", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    text = result.stdout.removesuffix("\n")
    assert text.startswith("abc") and len(text) == 43
    again = runner.invoke(app, ["sample", str(ckpt), "--prompt", "abc", "-n", "40", "--temperature", "0"])
    assert again.stdout == result.stdout


def test_seed_changes_the_text(ckpt):
    a = runner.invoke(app, ["sample", str(ckpt), "-n", "60", "--seed", "1"]).stdout
    b = runner.invoke(app, ["sample", str(ckpt), "-n", "60", "--seed", "2"]).stdout
    assert a != b


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "xyz"], "characters not in the vocabulary: 'x' 'y' 'z'"),
        (["--top-k", "99"], "sample.top_k = 99: must be <= the vocabulary size (13)"),
        (["--temperature", "-1"], "sample.temperature = -1.0"),
        (["-n", "0"], "sample.max_new_tokens = 0"),
        (["--device", "mps"], "device = 'mps' is not available"),
    ],
)
def test_sample_errors_are_one_line(ckpt, args, message):
    if "mps" in args and torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    result = runner.invoke(app, ["sample", str(ckpt), *args])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_drop_unknown_warns_and_continues(ckpt):
    result = runner.invoke(app, ["sample", str(ckpt), "--prompt", "abxz", "-n", "5", "--drop-unknown"])
    assert result.exit_code == 0
    assert "dropped characters not in the vocabulary: 'x' 'z'" in result.stderr
    assert result.stdout.startswith("ab")


def test_info_card(ckpt):
    result = runner.invoke(app, ["info", str(ckpt)])
    assert result.exit_code == 0
    assert "gpt model" in result.stdout and "n_layer      1" in result.stdout and "train_seconds" in result.stdout
    card = json.loads(runner.invoke(app, ["info", str(ckpt), "--json"]).stdout)
    assert card["model"] == "gpt" and card["vocab_size"] == 13 and card["params"] > 0
    switches = {"position", "qk_norm", "mlp", "zero_init", "logit_softcap", "token_shift", "attention_window"}
    switches |= {"full_attention_layers"}
    assert switches <= set(card["config"])  # how it was trained
    assert card["this_machine"]["sample_precision"] in (
        "auto = int8 on the cpu, timed for this checkpoint",
        "auto = float32 on the cpu, timed for this checkpoint",
    )


def test_bad_checkpoint_is_one_line_exit_1(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    for command in ("info", "sample"):
        result = runner.invoke(app, [command, str(bad)])
        assert result.exit_code == 1
        assert "bad.pt: not a readable checkpoint" in result.stderr


def test_help_has_examples():
    for command in ("sample", "info", "positions"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Example" in result.stdout


def test_int8_precision_samples_and_is_cpu_only(ckpt):
    result = runner.invoke(app, ["sample", str(ckpt), "--prompt", "abc", "-n", "20", "--precision", "int8"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.removesuffix("\n")) == 23
    bad = runner.invoke(app, ["sample", str(ckpt), "--precision", "fp16"])
    assert bad.exit_code == 2 and "sample.precision = 'fp16'" in bad.stderr


def test_compile_false_or_true_gives_the_same_text_and_a_bad_value_is_named(ckpt):
    from charlm.hardware import cxx_compiler

    args = ["sample", str(ckpt), "--prompt", "abc", "-n", "30", "--num-samples", "2", "--precision", "float32"]
    eager = runner.invoke(app, [*args, "--compile", "false"])
    assert eager.exit_code == 0, eager.output
    if cxx_compiler() is not None:
        compiled = runner.invoke(app, [*args, "--compile", "true"])
        assert compiled.exit_code == 0, compiled.output
        assert compiled.stdout == eager.stdout
    bad = runner.invoke(app, ["sample", str(ckpt), "--compile", "maybe"])
    assert bad.exit_code == 2 and "--compile 'maybe': must be true, false or auto" in bad.stderr


def test_info_quotes_the_metrics_where_dvc_yaml_puts_them(ckpt, tmp_path, monkeypatch):
    from pathlib import Path

    from charlm.pipeline import evaluate_metrics_path

    root = Path(__file__).resolve().parent.parent
    assert evaluate_metrics_path(root / "dvc.yaml", "gpt") == root / "metrics/gpt.json"
    # A project whose dvc.yaml writes metrics elsewhere: info follows it, from the directory it runs in.
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  evaluate:\n    matrix:\n      model: [gpt]\n    cmd: x\n"
        "    metrics:\n      - scores/${item.model}-exact.json:\n          cache: false\n"
    )
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores/gpt-exact.json").write_text(json.dumps({"val_loss": 1.2345}))
    monkeypatch.chdir(tmp_path)
    card = json.loads(runner.invoke(app, ["info", str(ckpt), "--json"]).stdout)
    assert card["metrics"] == {"val_loss": 1.2345}
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"val_loss": 2.0}))
    card = json.loads(runner.invoke(app, ["info", str(ckpt), "--json", "--metrics", str(other)]).stdout)
    assert card["metrics"] == {"val_loss": 2.0}
    monkeypatch.chdir(tmp_path / "scores")  # no dvc.yaml here: no metrics, still a card
    assert "metrics" not in json.loads(runner.invoke(app, ["info", str(ckpt), "--json"]).stdout)


def test_positions_prints_the_loss_by_position_and_refuses_what_it_cannot_measure(ckpt, tmp_path):
    split = tmp_path / "val.bin"
    split.write_bytes(TOK.encode_bytes("abc defgh ABC\n" * 20))
    result = runner.invoke(app, ["positions", str(ckpt), str(split), "--width", "4"])
    assert result.exit_code == 0, result.output
    rows = result.stdout.splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["0-3", "4-7", "8-11", "12-15"]  # block_size 16, 4 per row
    assert "blocks of 16" in result.stdout.splitlines()[0]
    short = tmp_path / "short.bin"
    short.write_bytes(TOK.encode_bytes("abc"))
    refused = runner.invoke(app, ["positions", str(ckpt), str(short)])
    assert refused.exit_code == 2 and "shorter than the model's block_size 16" in refused.stderr
    bigram = tmp_path / "bigram.pt"
    save_checkpoint(bigram, make_checkpoint("bigram", build_model("bigram", {"vocab_size": TOK.vocab_size}), TOK, {}))
    refused = runner.invoke(app, ["positions", str(bigram), str(split)])
    assert refused.exit_code == 2 and "has no context block" in refused.stderr


def test_several_samples_print_one_after_another_the_first_as_a_single_run_gives_it(ckpt):
    one = runner.invoke(app, ["sample", str(ckpt), "--prompt", "ab", "-n", "15", "--seed", "3"])
    three = runner.invoke(app, ["sample", str(ckpt), "--prompt", "ab", "-n", "15", "--seed", "3", "--num-samples", "3"])
    assert one.exit_code == three.exit_code == 0, three.output
    blocks = three.stdout.split("===== sample ")[1:]
    assert [b.split(" =====")[0] for b in blocks] == ["1 of 3", "2 of 3", "3 of 3"]
    assert blocks[0].split("=====\n", 1)[1].strip("\n") == one.stdout.strip("\n")
    bad = runner.invoke(app, ["sample", str(ckpt), "--num-samples", "0"])
    assert bad.exit_code == 2 and "sample.num_samples = 0" in bad.stderr
