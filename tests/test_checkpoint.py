"""Checkpoints load with weights_only=True: code in a pickle never runs; every failure names the file."""

import os
import pickle

import pytest
import torch

from charlm.checkpoint import CheckpointError, load_checkpoint, make_checkpoint, save_checkpoint
from charlm.models import build_model
from charlm.tokenizer import CharTokenizer

TOK = CharTokenizer.fit("abcdefgh\n ")


def gpt():
    torch.manual_seed(0)
    return build_model("gpt", dict(vocab_size=TOK.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "gpt.pt"
    save_checkpoint(path, make_checkpoint("gpt", gpt(), TOK, {"train_seconds": 1.5}))
    return path


def test_round_trip(saved):
    ckpt = load_checkpoint(saved, expected_model="gpt", tokenizer=TOK)
    model = ckpt.build()
    for name, tensor in gpt().state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)
    assert ckpt.tokenizer == TOK and ckpt.train_stats == {"train_seconds": 1.5}
    assert ckpt.n_params == sum(p.numel() for p in gpt().parameters())


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_that_runs_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "charlm-checkpoint-v1", "payload": Exploit(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="refused to load") as info:
        load_checkpoint(evil)
    assert str(evil) in str(info.value)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the unsafe path really would have run it
    assert marker.exists()


def test_plain_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "pwned2"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Exploit(str(marker))))
    with pytest.raises(CheckpointError, match="evil.pkl"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_truncated_and_corrupt_files(saved, tmp_path):
    data = saved.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    for path in (truncated, garbage):
        with pytest.raises(CheckpointError, match=path.name):
            load_checkpoint(path)


def test_other_model_type_and_foreign_vocab(saved):
    with pytest.raises(CheckpointError, match="is a gpt checkpoint, expected bigram"):
        load_checkpoint(saved, expected_model="bigram")
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(saved, tokenizer=CharTokenizer.fit("xyz"))


def test_not_a_charlm_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a charlm checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


def test_a_checkpoint_from_before_the_architecture_switches_still_loads(tmp_path):
    # Checkpoints written before gpt.position/qk_norm/... existed have no such keys: they are the
    # lecture's model, which is what the missing keys' defaults build.
    model = gpt()
    ckpt = make_checkpoint("gpt", model, TOK, {})
    for key in ("position", "qk_norm", "mlp", "zero_init", "logit_softcap", "token_shift", "attention_window",
                "full_attention_layers"):
        del ckpt.config[key]
    path = tmp_path / "old.pt"
    save_checkpoint(path, ckpt)
    loaded = load_checkpoint(path).build()
    idx = torch.randint(TOK.vocab_size, (1, 8))
    assert torch.equal(loaded(idx)[0], model.eval()(idx)[0])


def test_a_rope_checkpoint_round_trips_without_a_position_table(tmp_path):
    torch.manual_seed(0)
    config = dict(
        vocab_size=TOK.vocab_size,
        block_size=8,
        n_layer=1,
        n_head=2,
        n_embd=16,
        position="rope",
        qk_norm=True,
        mlp="relu2",
        logit_softcap=5.0,
        token_shift=True,
        attention_window=4,
    )
    model = build_model("gpt", config)
    with torch.no_grad():
        model.token_shift.fill_(0.3)  # not its initial 0, so a load that dropped it would show
    path = tmp_path / "rope.pt"
    save_checkpoint(path, make_checkpoint("gpt", model, TOK, {}))
    ckpt = load_checkpoint(path)
    assert not any("position_embedding" in name for name in ckpt.state_dict)
    assert ckpt.config["position"] == "rope" and ckpt.config["logit_softcap"] == 5.0 and ckpt.config["token_shift"]
    assert ckpt.config["attention_window"] == 4
    idx = torch.randint(TOK.vocab_size, (1, 8))
    assert torch.equal(ckpt.build()(idx)[0], model.eval()(idx)[0])
