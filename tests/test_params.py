"""params.yaml validation: every bad value is one clear line naming the key; YAML 1.1 quirks work."""

import re

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.params import GPTParams, Params, ParamsError, load_params, parse_params
from tests.helpers import ROOT

BAD = [
    # (params, what the message must contain)
    ({"seed": -1}, "seed = -1"),
    ({"seed": "x"}, "seed = 'x'"),
    ({"seed": 1.5}, "seed = 1.5"),
    ({"device": "gpu"}, "device = 'gpu'"),
    ({"device": "cuda:"}, "device = 'cuda:'"),
    ({"device": "cuda:x"}, "device = 'cuda:x'"),
    ({"device": 0}, "device = 0"),
    ({"threads": -2}, "threads = -2"),
    ({"data": {"url": ""}}, "data.url"),
    ({"data": {"sha256": "abc"}}, "data.sha256 = 'abc'"),
    ({"data": {"sha256": 12}}, "data.sha256 = 12"),
    ({"data": "x"}, "data: must be a mapping"),
    ({"split": {"val_fraction": 0}}, "split.val_fraction = 0.0"),
    ({"split": {"val_fraction": 1}}, "split.val_fraction = 1.0"),
    ({"split": {"val_fraction": -0.1}}, "split.val_fraction = -0.1"),
    ({"split": {"val_fraction": "ten percent"}}, "split.val_fraction = 'ten percent'"),
    ({"split": {"val_fraction": ".nan"}}, "split.val_fraction"),
    ({"bigram": {"batch_size": 0}}, "bigram.batch_size = 0"),
    ({"bigram": {"batch_size": -4}}, "bigram.batch_size = -4"),
    ({"bigram": {"batch_size": True}}, "bigram.batch_size = True"),
    ({"bigram": {"batch_size": 3.5}}, "bigram.batch_size = 3.5"),
    ({"bigram": {"max_iters": 0}}, "bigram.max_iters = 0"),
    ({"bigram": {"learning_rate": 0}}, "bigram.learning_rate = 0.0"),
    ({"bigram": {"learning_rate": "fast"}}, "bigram.learning_rate = 'fast'"),
    ({"bigram": {"eval_interval": 0}}, "bigram.eval_interval = 0"),
    ({"bigram": {"eval_iters": -1}}, "bigram.eval_iters = -1"),
    ({"bigram": {"n_layer": 2}}, "bigram.n_layer: unknown key"),
    ({"gpt": {"dropout": 1.0}}, "gpt.dropout = 1.0"),
    ({"gpt": {"dropout": -0.1}}, "gpt.dropout = -0.1"),
    ({"gpt": {"n_embd": 130, "n_head": 4}}, "gpt.n_embd = 130: must be divisible by gpt.n_head (4)"),
    ({"gpt": {"n_head": 0}}, "gpt.n_head = 0"),
    ({"gpt": {"n_layer": -1}}, "gpt.n_layer = -1"),
    ({"gpt": {"block_size": 0}}, "gpt.block_size = 0"),
    ({"gpt": {"bach_size": 4}}, "did you mean gpt.batch_size?"),
    ({"gpt": {"precision": "fp8"}}, "gpt.precision = 'fp8'"),
    ({"gpt": {"optimizer": "sgd"}}, "gpt.optimizer = 'sgd': must be one of ('adamw', 'muon')"),
    ({"bigram": {"optimizer": "muon"}}, "bigram.optimizer = 'muon': must be adamw"),
    ({"bigram": {"muon_split_qkv": True}}, "bigram.muon_split_qkv: unknown key"),  # the GPT's only
    ({"gpt": {"muon_split_qkv": "split"}}, "gpt.muon_split_qkv = 'split'"),
    ({"gpt": {"ema_decay": 1.0}}, "gpt.ema_decay = 1.0: must be in [0, 1)"),
    ({"gpt": {"attention_window": -8}}, "gpt.attention_window = -8: must be >= 0"),
    ({"gpt": {"full_attention_layers": 5}}, "gpt.full_attention_layers = 5: must be between 0 and gpt.n_layer (4)"),
    ({"gpt": {"batch_windows": "shuffled"}}, "gpt.batch_windows = 'shuffled': must be one of ('random', 'epoch')"),
    ({"bigram": {"batch_windows": 1}}, "bigram.batch_windows = 1: must be a string"),
    ({"bigram": {"ema_decay": -0.5}}, "bigram.ema_decay = -0.5: must be in [0, 1)"),
    ({"gpt": {"warmup_iters": -1}}, "gpt.warmup_iters = -1"),
    ({"gpt": {"min_lr_ratio": 2}}, "gpt.min_lr_ratio = 2.0"),
    ({"gpt": {"weight_decay": -1}}, "gpt.weight_decay = -1.0"),
    ({"gpt": {"weight_decay": 200}}, "gpt.weight_decay = 200.0: must be >= 0 and under 1 / learning_rate (100)"),
    ({"gpt": {"grad_clip": -1}}, "gpt.grad_clip = -1.0"),
    ({"gpt": {"bias": "yes"}}, "gpt.bias = 'yes'"),
    ({"sample": {"temperature": -0.5}}, "sample.temperature = -0.5"),
    ({"sample": {"max_new_tokens": 0}}, "sample.max_new_tokens = 0"),
    ({"sample": {"top_k": -1}}, "sample.top_k = -1"),
    ({"sample": {"precision": "int4"}}, "sample.precision = 'int4': must be one of ('auto', 'float32', 'int8')"),
    ({"sample": {"prompt": 42}}, "sample.prompt = 42"),
    ({"devcie": "cpu"}, "did you mean device?"),
    ({"sampel": {}}, "did you mean sample?"),
]


@pytest.mark.parametrize(("raw", "message"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_params_fail_with_one_line_naming_the_key(raw, message):
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_yaml_11_exponent_floats_work(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("gpt:\n  learning_rate: 3e-4\nsplit:\n  val_fraction: 1e-1\n")
    assert yaml.safe_load(path.read_text())["gpt"]["learning_rate"] == "3e-4"  # the quirk itself
    p = load_params(path)
    assert p.gpt.train.learning_rate == pytest.approx(3e-4) and p.split.val_fraction == pytest.approx(0.1)


def test_project_params_yaml_is_valid_and_mirrors_the_dataclass_defaults():
    p = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == {f for f in Params.__dataclass_fields__}  # every key documented in params.yaml
    assert p.device == "cpu"
    assert isinstance(p.gpt, GPTParams)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpt: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML at line"):
        load_params(bad)


def test_empty_file_means_all_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("")
    assert load_params(path) == Params()


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
known_sections = st.sampled_from(["seed", "device", "threads", "data", "split", "bigram", "gpt", "sample"])
section_keys = st.sampled_from(
    [
        "batch_size",
        "block_size",
        "learning_rate",
        "dropout",
        "n_head",
        "n_embd",
        "url",
        "sha256",
        "val_fraction",
        "temperature",
        "top_k",
        "prompt",
        "max_new_tokens",
        "precision",
        "optimizer",
        "ema_decay",
        "batch_windows",
        "bias",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(known_sections, yaml_values | st.dictionaries(section_keys, yaml_values, max_size=4), max_size=5)
)
def test_no_input_crashes_the_loader(raw):
    """Whatever the YAML holds, the loader returns Params or raises ParamsError: never a traceback."""
    try:
        assert isinstance(parse_params(raw), Params)
    except ParamsError as e:
        assert "\n" not in str(e)


def test_sample_precision_auto_is_timed_on_the_cpu_and_int8_is_refused_elsewhere():
    from charlm.errors import UsageError
    from charlm.hardware import sampling_weights

    assert sampling_weights("cpu", "auto") == "auto"  # decided per checkpoint by timing both
    assert sampling_weights("cuda", "auto") == sampling_weights("mps", "auto") == "float32"
    assert sampling_weights("cpu", "float32") == "float32"
    with pytest.raises(UsageError, match="int8': runs on the CPU only, and the device is cuda"):
        sampling_weights("cuda", "int8")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seed: 1\nseed: 2\n", "seed: given twice (lines 1 and 2)"),
        ("gpt:\n  n_layer: 2\n  dropout: 0.1\n  n_layer: 3\n", "n_layer: given twice (lines 2 and 4)"),
        ("sample:\n  top_k: 1\nsample:\n  top_k: 2\n", "sample: given twice (lines 1 and 3)"),
    ],
)
def test_a_key_given_twice_is_an_error_naming_it_and_both_lines(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=re.escape(message)) as info:
        load_params(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_the_same_key_in_different_sections_is_fine(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("bigram:\n  max_iters: 5\ngpt:\n  max_iters: 7\n")
    assert load_params(path).gpt.train.max_iters == 7


def test_the_gpt_section_is_the_training_settings_beside_the_models_config():
    from charlm.models.gpt.config import GPTArchitecture
    from charlm.params import GPTTraining

    gpt = load_params(ROOT / "params.yaml").gpt
    assert isinstance(gpt.train, GPTTraining) and isinstance(gpt.model, GPTArchitecture)
    assert gpt.train.block_size == gpt.model.block_size == 512  # the one key: training's blocks, the model's context
    default = GPTParams.of()  # a key left out takes the lecture-style default
    assert (default.train.block_size, default.model.block_size, default.model.position) == (128, 128, "learned")
    assert gpt.replace(n_layer=5).model.n_layer == 5 and gpt.replace(n_layer=5).train == gpt.train
    with pytest.raises(ParamsError, match="gpt.n_embd = 30: must be divisible by gpt.n_head"):
        gpt.replace(n_embd=30)
