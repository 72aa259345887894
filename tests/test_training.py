"""The training loop: determinism, the bigram floor, the fast bf16 path against float32."""

import math

import pytest
import torch
import torch.nn.functional as F

from charlm.batches import get_batch
from charlm.evaluation import estimate_loss, full_context, position_losses, split_loss
from charlm.models import build_model, config_for
from charlm.models.bigram.model import bigram_loss_floor
from charlm.optim import Muon, make_optimizer
from charlm.params import BigramParams, GPTParams, TrainConfig
from charlm.training import learning_rate_at
from tests import helpers
from tests.helpers import cpu_runtime, token_splits, train_on_cpu


@pytest.fixture(scope="module")
def splits():
    return token_splits(600)


def train_gpt(splits, seed=0, **overrides):
    vocab_size, tr, va = splits
    cfg = GPTParams.of(
        **(
            dict(
                batch_size=8,
                block_size=16,
                max_iters=15,
                eval_interval=5,
                eval_iters=2,
                n_layer=1,
                n_head=2,
                n_embd=16,
                dropout=0.1,
                precision="float32",
                learning_rate=3e-3,
                warmup_iters=3,
            )
            | overrides
        )
    )
    torch.manual_seed(seed)
    model = build_model("gpt", config_for("gpt", cfg, vocab_size))
    return model, train_on_cpu(model, tr, va, cfg, seed)


def test_same_seed_gives_identical_weights_and_losses(splits):
    a, ra = train_gpt(splits, seed=3)
    b, rb = train_gpt(splits, seed=3)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name
    assert ra.curve == rb.curve
    c, rc = train_gpt(splits, seed=4)
    assert rc.curve != ra.curve


def test_curve_has_start_and_end_points_and_loss_falls(splits):
    _, result = train_gpt(splits, max_iters=30, eval_interval=10)
    assert [p.step for p in result.curve] == [0, 10, 20, 30]
    assert result.curve[-1].val_loss < result.curve[0].val_loss


def test_bigram_trains_to_its_floor(splits):
    vocab_size, tr, va = splits
    cfg = BigramParams.of(
        batch_size=64,
        block_size=16,
        max_iters=400,
        learning_rate=0.1,
        min_lr_ratio=0.0,
        eval_interval=400,
        eval_iters=2,
    )
    torch.manual_seed(0)
    model = build_model("bigram", {"vocab_size": vocab_size})
    train_on_cpu(model, tr, va, cfg, 0)
    floor = bigram_loss_floor(tr, va, vocab_size)
    # On a tiny corpus add-one smoothing is a strong prior, so the trained table may even beat it.
    assert split_loss(model, va, 64, torch.device("cpu")) < floor + 0.02


def test_learning_rate_schedule():
    cfg = TrainConfig(learning_rate=1.0, min_lr_ratio=0.1, warmup_iters=10, max_iters=110)
    assert learning_rate_at(0, cfg) == pytest.approx(0.1)
    assert learning_rate_at(9, cfg) == pytest.approx(1.0)
    assert learning_rate_at(60, cfg) == pytest.approx(0.55)
    assert learning_rate_at(110, cfg) == pytest.approx(0.1)




def test_bf16_fast_path_stays_close_to_float32_reference(splits):
    """The bf16 autocast path (explicit attention on the CPU) against plain float32 SDPA."""
    vocab_size, tr, _ = splits
    torch.manual_seed(0)
    model = build_model("gpt", dict(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    x, y = get_batch(tr, 16, 32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits32, loss32 = model(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits16, loss16 = model(x, y)
    assert logits16.dtype == torch.bfloat16
    assert abs(loss16.item() - loss32.item()) < 0.01
    assert (logits16.float() - logits32).abs().max() < 0.05
    # and training in bf16 still learns
    _, result = train_gpt(splits, precision="bfloat16", max_iters=30, eval_interval=30)
    assert result.precision == "bfloat16"
    assert result.curve[-1].train_loss < math.log(vocab_size) - 0.5




def test_muon_updates_the_blocks_matrices_and_adamw_the_rest(splits):
    """With `optimizer: muon` every hidden matrix goes to Muon, every other parameter to AdamW."""
    vocab_size, _, _ = splits
    cfg = GPTParams.of(optimizer="muon", n_layer=2, n_embd=16, n_head=2, block_size=16)
    model = build_model("gpt", config_for("gpt", cfg, vocab_size))
    optimizer = make_optimizer(model, cfg.train, cpu_runtime())
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    expected = {id(p) for n, p in named.items() if n.startswith("blocks.") and n.endswith("weight") and p.dim() == 2}
    assert in_muon == expected and len(expected) == 2 * 4  # qkv, attn proj, fc, mlp proj per block
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == {id(p) for p in named.values()}
    assert id(model.token_embedding_table.weight) in in_adamw and id(model.lm_head.weight) in in_adamw
    assert len(optimizer.param_groups) == len(muon.param_groups) + len(adamw.param_groups)


def test_muon_training_is_deterministic_and_learns(splits):
    vocab_size, _, _ = splits
    a, ra = train_gpt(splits, seed=5, optimizer="muon", max_iters=30, eval_interval=30)
    b, rb = train_gpt(splits, seed=5, optimizer="muon", max_iters=30, eval_interval=30)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name
    assert ra.curve == rb.curve
    assert ra.curve[-1].train_loss < math.log(vocab_size) - 0.5


def test_muon_schedule_reaches_both_optimizers(splits):
    """The loop's lr schedule writes every group: Muon's lr is not stuck at its initial value."""
    vocab_size, tr, va = splits
    cfg = GPTParams.of(
        optimizer="muon",
        n_layer=1,
        n_embd=16,
        n_head=2,
        block_size=16,
        batch_size=4,
        max_iters=4,
        warmup_iters=0,
        min_lr_ratio=0.0,
        learning_rate=1e-3,
        eval_interval=100,
        eval_iters=1,
        precision="float32",
    )
    seen = []
    real_step = Muon.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    model = build_model("gpt", config_for("gpt", cfg, vocab_size))
    Muon.step = spy
    try:
        train_on_cpu(model, tr, va, cfg, 0)
    finally:
        Muon.step = real_step
    assert seen == pytest.approx([learning_rate_at(s, cfg.train) for s in range(4)])
    assert seen[0] > seen[-1]


def test_bigram_has_no_matrices_for_muon():
    from charlm.params import ParamsError, TrainConfig

    model = build_model("bigram", {"vocab_size": 5})
    with pytest.raises(ParamsError, match="no hidden matrices"):
        make_optimizer(model, TrainConfig(optimizer="muon"), cpu_runtime())


def test_weight_average_is_the_exponential_average_of_the_steps_weights(splits):
    """With ema_decay the model ends holding the decay-weighted average of every step's weights,
    the initial ones included; the curve measures both the trained weights and that average. A
    constant learning rate makes a k-step run the first k steps of a longer one, so each step's
    weights come from a shorter run."""
    vocab_size, tr, va = splits
    decay = 0.6
    constant = dict(dropout=0.0, warmup_iters=0, min_lr_ratio=1.0, optimizer="muon", eval_interval=4)
    torch.manual_seed(0)  # as train_gpt does before building its model
    initial = build_model("gpt", dict(vocab_size=vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    steps = [initial.state_dict()] + [train_gpt(splits, **constant, max_iters=k)[0].state_dict() for k in (1, 2, 3, 4)]
    averaged, result = train_gpt(splits, **constant, max_iters=4, ema_decay=decay)
    for name, value in averaged.state_dict().items():
        expected = steps[0][name]
        for weights in steps[1:]:
            expected = decay * expected + (1 - decay) * weights[name]
        assert torch.allclose(value, expected, atol=1e-6), name
        assert not torch.allclose(value, steps[-1][name]), name
    eval_gen = torch.Generator().manual_seed(0 + 1)  # train()'s eval batches: seed + 1
    cfg = TrainConfig(block_size=16, eval_iters=2, batch_size=8)  # train_gpt's estimate: 2 batches of 8 blocks
    losses = estimate_loss(averaged, {"train": tr, "val": va}, cfg, eval_gen, cpu_runtime())
    assert result.curve[-1].average_val_loss == pytest.approx(losses["val"], abs=1e-6)
    last = build_model("gpt", dict(vocab_size=vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    last.load_state_dict(steps[-1])
    eval_gen = torch.Generator().manual_seed(0 + 1)
    trained = estimate_loss(last, {"train": tr, "val": va}, cfg, eval_gen, cpu_runtime())
    assert result.curve[-1].val_loss == pytest.approx(trained["val"], abs=1e-6)
    assert result.curve[-1].train_loss == pytest.approx(trained["train"], abs=1e-6)
    # Step 0 measures the initial weights once: the average is those weights then.
    eval_gen = torch.Generator().manual_seed(0 + 1)
    at_start = estimate_loss(initial, {"train": tr, "val": va}, cfg, eval_gen, cpu_runtime())
    first = result.curve[0]
    assert first.step == 0 and (first.average_train_loss, first.average_val_loss) == (first.train_loss, first.val_loss)
    assert first.val_loss == pytest.approx(at_start["val"], abs=1e-6)
    assert first.train_loss == pytest.approx(at_start["train"], abs=1e-6)


def test_curve_shows_the_trained_weights_ahead_of_the_lagging_average_early_on(splits):
    _, result = train_gpt(splits, max_iters=40, eval_interval=10, ema_decay=0.95, dropout=0.0)
    early = result.curve[1]  # step 10: the average still holds 0.95**10 = 60% of the initial weights
    assert early.val_loss < early.average_val_loss and early.train_loss < early.average_train_loss
    _, plain = train_gpt(splits, max_iters=40, eval_interval=10, ema_decay=0.0, dropout=0.0)
    assert all((p.average_train_loss, p.average_val_loss) == (p.train_loss, p.val_loss) for p in plain.curve)
    # The same seed trains the same weights whether or not an average is kept beside them.
    assert [p.val_loss for p in plain.curve] == [p.val_loss for p in result.curve]


def test_a_smoke_run_shorter_than_the_warm_up_clamps_it():
    # `dvc exp run -S gpt.max_iters=10` with the default warmup_iters (100) must just work.
    cfg = TrainConfig(learning_rate=1.0, min_lr_ratio=0.0, warmup_iters=100, max_iters=10)
    lrs = [learning_rate_at(s, cfg) for s in range(10)]
    assert lrs[0] == 1.0 and lrs[-1] < lrs[1]  # one step of warm-up, then the cosine decay
    long = TrainConfig(learning_rate=1.0, warmup_iters=100, max_iters=2000)
    assert learning_rate_at(49, long) == pytest.approx(0.5)  # a long run keeps its full warm-up


def test_rope_float32_training_after_an_evaluation_without_a_weight_average(splits):
    # Regression: the evaluation at step 0 runs in inference mode; with no weight average it uses the
    # trained model itself, whose cached RoPE tables must still be usable by the backward pass.
    _, result = train_gpt(
        splits, position="rope", precision="float32", ema_decay=0.0, max_iters=3, eval_interval=1, dropout=0.1
    )
    assert len(result.curve) == 4


def test_position_losses_average_to_the_split_loss_and_match_each_window_alone(splits):
    vocab_size, _, va = splits
    torch.manual_seed(0)
    model = build_model("gpt", dict(vocab_size=vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    data = va[: 16 * 7 + 1]  # 7 full windows of 16 and no partial one
    by_position = position_losses(model, data, 16, torch.device("cpu"))
    assert by_position.shape == (16,)
    assert by_position.mean().item() == pytest.approx(split_loss(model, data, 16, torch.device("cpu")), rel=1e-5)
    # Position 5 by hand: each window's own forward pass, its 6th prediction.
    with torch.no_grad():
        at_five = [
            F.cross_entropy(model(data[s : s + 16].long()[None])[0][0, 5], data[s + 6].long()).item()
            for s in range(0, 16 * 7, 16)
        ]
    assert by_position[5].item() == pytest.approx(sum(at_five) / 7, rel=1e-5)
    with pytest.raises(ValueError, match="no full window"):
        position_losses(model, va[:10], 16, torch.device("cpu"))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_windowed_gpt_learns_on_either_attention_path(splits, monkeypatch, precision):
    """Sliding-window attention inside the real loop: SDPA in float32, the explicit ops with bf16 (forced
    native here) and with dropout on the attention weights (dropout=0.1 in train_gpt)."""
    monkeypatch.setenv("CHARLM_CPU_BF16", "1")
    model, result = train_gpt(
        splits, block_size=32, attention_window=8, position="rope", max_iters=30, precision=precision
    )
    assert result.precision == precision
    first, last = result.curve[0], result.curve[-1]
    assert last.train_loss < first.train_loss - 0.3


# --- a diverged run stops --------------------------------------------------------------------------


def test_a_non_finite_loss_stops_training_at_its_step_and_no_state_is_saved_after_it():
    from charlm.models import build_model, config_for
    from charlm.params import GPTParams
    from charlm.training import NonFiniteLoss

    vocab, tr, va = token_splits(300)
    cfg = GPTParams.of(
        batch_size=4, block_size=16, max_iters=20, eval_interval=100, eval_iters=1, n_layer=1, n_head=2, n_embd=16,
        precision="float32",
    )
    model = build_model("gpt", config_for("gpt", cfg, vocab))
    saved_steps = []

    def poison(step, total, loss, tokens_per_s):
        if step == 6:  # as if step 6's update had diverged: every later loss is NaN
            with torch.no_grad():
                model.lm_head.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLoss) as e:
        train_on_cpu(
            model, tr, va, cfg, 0, on_progress=poison,
            save_state=lambda state: saved_steps.append(state.step), save_every_seconds=0.0,
        )
    message = str(e.value)
    assert message.startswith("the training loss is not finite (NaN or infinite) at step 7 on cpu in float32;")
    assert "nothing was written" in message and "learning_rate" in message and "\n" not in message
    assert saved_steps == [1, 2, 3, 4, 5, 6]  # the weights were poisoned after step 6's state


def test_an_absurd_learning_rate_stops_training_and_keeps_only_finite_states(monkeypatch):
    from charlm import training
    from charlm.models import build_model, config_for
    from charlm.params import GPTParams

    vocab, tr, va = token_splits(300)
    cfg = GPTParams.of(
        batch_size=4, block_size=16, max_iters=20, eval_interval=100, eval_iters=1, n_layer=1, n_head=2, n_embd=16,
        precision="float32",
    )
    scheduled = training.learning_rate_at
    # Step 6's update diverges: its loss was finite, the weights after it are not.
    monkeypatch.setattr(training, "learning_rate_at", lambda step, c: float("nan") if step == 6 else scheduled(step, c))
    states = []
    diverged = r"^the weights are not finite \(NaN or infinite\) after step 7 on cpu"
    with pytest.raises(training.NonFiniteLoss, match=diverged):
        train_on_cpu(
            build_model("gpt", config_for("gpt", cfg, vocab)), tr, va, cfg, 0,
            save_state=lambda state: states.append((state.step, [w.clone() for w in state.model.values()])),
            save_every_seconds=0.0,
        )
    assert [step for step, _ in states] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(w).all() for w in states[-1][1])


def _tiny_run(runtime, max_iters=10):
    from charlm import training
    from tests import helpers

    vocab, train_data, val_data = token_splits()
    cfg = GPTParams.of(**(helpers.TINY_GPT | {"max_iters": max_iters})).train
    model = helpers.tiny_gpt(vocab)
    result = training.train(model.train(), train_data, val_data, cfg, runtime=runtime, seed=0)
    return model, result


def test_compile_trains_like_eager_and_a_failing_compiler_falls_back_in_one_line(monkeypatch, capsys):
    # torch.compile with the "eager" backend (no C++ compiler needed) must give eager's numbers; a
    # compiler that raises at the first call costs one line on stderr and the run goes on eagerly.
    import dataclasses

    runtime = cpu_runtime()
    eager = _tiny_run(runtime)[0].state_dict()
    compiling = dataclasses.replace(runtime, compile=True)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda net: real_compile(net, backend="eager"))
    compiled = _tiny_run(compiling)[0].state_dict()
    assert all(torch.equal(eager[k], compiled[k]) for k in eager)

    def broken(net):
        def fail(*args):
            raise RuntimeError("backend compiler failed\nlong traceback")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    capsys.readouterr()
    fallback = _tiny_run(compiling)[0].state_dict()
    assert all(torch.equal(eager[k], fallback[k]) for k in eager)
    err = capsys.readouterr().err
    assert err.count("torch.compile failed (RuntimeError: backend compiler failed); training eagerly") == 1


def test_float16_trains_with_a_loss_scaler(monkeypatch):
    # float16 autocast (a GPU without bf16) goes through torch's GradScaler; on the CPU the same path runs.
    import dataclasses

    scaled = []
    real_scale = torch.amp.GradScaler.scale
    def scale(self, x):
        scaled.append(self.is_enabled())
        return real_scale(self, x)

    monkeypatch.setattr(torch.amp.GradScaler, "scale", scale)
    model, result = _tiny_run(dataclasses.replace(cpu_runtime(), autocast=torch.float16), max_iters=20)
    assert scaled and all(scaled)  # every backward through an enabled scaler
    assert result.curve[-1].val_loss < result.curve[0].val_loss
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_split_loss_at_a_temperature_scores_the_logits_divided_by_it():
    data = torch.randint(0, 11, (16 * 5 + 1,), generator=torch.Generator().manual_seed(4), dtype=torch.int64)
    net = helpers.tiny_gpt(11, block_size=16, position="rope", attention_window=4)
    x, y = data[:-1].view(5, 16), data[1:].view(5, 16)
    with torch.no_grad():
        logits, own = net(x, y)
    cpu = torch.device("cpu")
    assert split_loss(net, data, 16, cpu) == own.item()  # at 1, exactly the model's own loss
    for temperature in (0.5, 1.3):
        by_hand = F.cross_entropy((logits / temperature).transpose(1, 2), y).item()
        assert split_loss(net, data, 16, cpu, temperature=temperature) == pytest.approx(by_hand, rel=1e-6)
        assert by_hand != pytest.approx(own.item(), rel=1e-3)


def test_full_context_split_loss_is_each_characters_loss_given_all_that_reaches_it():
    data = torch.randint(0, 11, (150,), generator=torch.Generator().manual_seed(3), dtype=torch.int64)
    net = helpers.tiny_gpt(11, block_size=16, position="rope", attention_window=4)  # 2 layers: 7 reach a prediction
    context = full_context(net, 16)
    assert context == net.receptive_field - 1 == 6
    with torch.no_grad():  # one forward per character, over exactly the characters that reach it
        by_hand = [
            F.cross_entropy(net(data[max(0, j - context) : j + 1][None])[0][0, -1], data[j + 1]).item()
            for j in range(len(data) - 1)
        ]
    got = split_loss(net, data, 16, torch.device("cpu"), context=context)
    assert got == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)
    # Non-overlapping windows predict their first characters from less: a different number.
    assert split_loss(net, data, 16, torch.device("cpu")) != pytest.approx(sum(by_hand) / len(by_hand), rel=1e-4)
    full_attention = helpers.tiny_gpt(11, block_size=16)
    assert full_context(full_attention, 16) == 8  # at most half a window
