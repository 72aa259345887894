import math

import pytest
import torch

from charlm.models import build_model, config_for, count_params
from charlm.models.bigram.model import bigram_loss_floor
from charlm.params import GPTParams
from charlm.sampling import KVCache
from tests import helpers

V = 65


def tiny_gpt(**overrides):
    return helpers.tiny_gpt(V, **overrides)


def prefill(model, idx):
    """A new KV cache holding `idx`, and the next character's logits (B, V)."""
    cache = KVCache(model.config, idx.size(0), idx.device, torch.float32)
    return extend(model, idx, cache)


def extend(model, idx, cache):
    logits, _ = model(idx, kv_cache=cache)
    return logits[:, -1], cache


@pytest.mark.parametrize("name", ["bigram", "gpt"])
def test_one_interface(name):
    torch.manual_seed(0)
    model = build_model(name, {"vocab_size": V} | ({"block_size": 16, "n_embd": 32} if name == "gpt" else {}))
    idx = torch.randint(V, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, V) and loss is None
    logits, loss = model(idx, idx)
    assert loss.ndim == 0


def test_gpt_loss_at_init_is_near_uniform():
    model = tiny_gpt()
    idx = torch.randint(V, (8, 16), generator=torch.Generator().manual_seed(1))
    _, loss = model(idx, torch.roll(idx, -1, 1))
    assert abs(loss.item() - math.log(V)) < 0.1  # small init: near-uniform predictions, loss ~ ln(V)


def test_causal_masking_future_tokens_never_change_earlier_logits():
    model = tiny_gpt()
    idx = torch.randint(V, (1, 16), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 7) % V
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_kv_cache_matches_full_forward():
    model = tiny_gpt()
    idx = torch.randint(V, (2, 12), generator=torch.Generator().manual_seed(3))
    full, _ = model(idx)
    last, cache = prefill(model, idx[:, :5])
    assert torch.allclose(last, full[:, 4], atol=1e-5)
    last, cache = extend(model, idx[:, 5:6], cache)
    assert torch.allclose(last, full[:, 5], atol=1e-5)
    last, cache = extend(model, idx[:, 6:12], cache)  # several new tokens at once
    assert torch.allclose(last, full[:, 11], atol=1e-5)


def test_sequence_longer_than_block_size_is_an_error():
    with pytest.raises(ValueError, match="block_size"):
        tiny_gpt()(torch.zeros(1, 17, dtype=torch.long))


def test_config_from_params_section():
    section = GPTParams.of(n_layer=1, n_head=2, n_embd=8, block_size=4)
    config = config_for("gpt", section, vocab_size=11)
    lecture = dict(position="learned", qk_norm=False, mlp="gelu", zero_init=False, logit_softcap=0.0, token_shift=False)
    lecture |= dict(attention_window=0, full_attention_layers=0)  # every earlier character
    assert config == dict(vocab_size=11, block_size=4, n_layer=1, n_head=2, n_embd=8, dropout=0.0, bias=True) | lecture
    assert count_params(build_model("gpt", config)) > 0


def test_bigram_floor_is_the_count_optimum():
    train = torch.tensor([0, 1, 0, 1, 0, 2], dtype=torch.uint8)
    val = torch.tensor([0, 1, 0], dtype=torch.uint8)
    # counts+1 from 0: to 0 ->1, to 1 ->3, to 2 ->2 (sum 6); from 1: to 0 ->3, others 1 (sum 5)
    expected = -(math.log(3 / 6) + math.log(3 / 5)) / 2
    assert bigram_loss_floor(train, val, 3) == pytest.approx(expected)








def test_eval_mode_has_no_dropout():
    model = tiny_gpt(dropout=0.5)
    idx = torch.randint(V, (2, 16), generator=torch.Generator().manual_seed(4))
    assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])


def test_the_default_config_is_the_lecture_model_written_as_nanogpt_writes_it():
    """GPTConfig's defaults against benchmarks/reference.py, a plain nanoGPT-style GPT, weights copied."""
    from benchmarks.reference import ReferenceGPT

    ours = tiny_gpt()
    reference = ReferenceGPT(V, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0).eval()
    names = {
        "token_embedding_table": "wte", "position_embedding_table": "wpe", "blocks": "h", "ln1": "ln_1",
        "ln2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.0", "mlp.proj": "mlp.2",
    }  # fmt: skip
    weights = {}
    for name, tensor in ours.state_dict().items():
        for a, b in names.items():
            name = name.replace(a, b)
        weights[name] = tensor
    reference.load_state_dict(weights)  # strict: every weight has its counterpart
    idx = torch.randint(V, (2, 16), generator=torch.Generator().manual_seed(4))
    ours_logits, ours_loss = ours(idx, idx)
    reference_logits, reference_loss = reference(idx, idx)
    assert torch.allclose(ours_logits, reference_logits, atol=1e-5)
    assert torch.allclose(ours_loss, reference_loss, atol=1e-6)


def test_rope_against_an_explicit_rotation():
    from charlm.models.gpt.model import apply_rope, rope_angles

    hs, T = 8, 5
    x = torch.randn(1, 1, T, hs, generator=torch.Generator().manual_seed(5))
    cos, sin = rope_angles(hs, 3, T, torch.device("cpu"))
    out = apply_rope(x, cos, sin)
    for t in range(T):
        for i in range(hs // 2):
            theta = (3 + t) * 10000.0 ** (-2 * i / hs)
            rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
            pair = rot @ torch.stack([x[0, 0, t, i], x[0, 0, t, i + hs // 2]])
            assert torch.allclose(torch.stack([out[0, 0, t, i], out[0, 0, t, i + hs // 2]]), pair, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_the_halves_formula_bit_for_bit_forward_and_backward(dtype):
    """The whole-width tables give exactly the numbers (and gradients) of the textbook halves formula."""
    from charlm.models.gpt.model import apply_rope, rope_angles

    hs, T = 16, 7
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, T, hs, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(2, 3, T, hs, generator=g).to(dtype)
    cos, sin = rope_angles(hs, 5, T, torch.device("cpu"))
    out = apply_rope(x, cos, sin)
    (fast,) = torch.autograd.grad(out, x, grad)

    angles = torch.arange(5, 5 + T, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(0, hs, 2, dtype=torch.float64) / hs
    )
    c, s = angles.cos().float().to(dtype), angles.sin().float().to(dtype)
    x1, x2 = x[..., : hs // 2], x[..., hs // 2 :]
    ref = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    (ref_grad,) = torch.autograd.grad(ref, x, grad)
    assert torch.equal(out, ref)
    assert torch.equal(fast, ref_grad)


def test_rope_scores_depend_only_on_relative_position():
    from charlm.models.gpt.model import apply_rope, rope_angles

    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)

    def score(pq, pk):
        cq, sq = rope_angles(8, pq, 1, torch.device("cpu"))
        ck, sk = rope_angles(8, pk, 1, torch.device("cpu"))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert score(7, 3) == pytest.approx(score(1007, 1003), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-4)


def test_qk_norm_gives_unit_rms_queries_and_keys_per_head():
    model = tiny_gpt(qk_norm=True)
    attn = model.blocks[0].attn
    q, k, _ = attn.heads(attn.qkv(torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(7))), None)
    assert q.shape == (2, 2, 6, 16)
    for t in (q, k):
        assert torch.allclose(t.pow(2).mean(-1).sqrt(), torch.ones(2, 2, 6), atol=1e-3)


def test_relu2_zero_init_and_softcap():
    model = tiny_gpt(mlp="relu2", zero_init=True, logit_softcap=2.0)
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if n.endswith("proj.weight"))
    mlp = model.blocks[0].mlp
    torch.nn.init.normal_(mlp.proj.weight, generator=torch.Generator().manual_seed(3))
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(mlp(x), mlp.proj(torch.relu(mlp.fc(x)) ** 2), atol=1e-6)  # MLP.forward squares a ReLU
    assert not torch.allclose(mlp(x), mlp.proj(torch.nn.functional.gelu(mlp.fc(x))), atol=1e-3)
    logits, _ = model(torch.randint(V, (2, 16)))
    assert logits.abs().max() <= 2.0


@pytest.mark.parametrize("bad", [{"position": "alibi"}, {"mlp": "swiglu"}, {"logit_softcap": -1.0}])
def test_bad_switches_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        tiny_gpt(**bad)


@pytest.mark.parametrize(
    "arch",
    [
        {},
        {"position": "rope", "qk_norm": True, "mlp": "relu2"},
        {"position": "rope", "token_shift": True},
        {"token_shift": True},
        {"position": "rope", "attention_window": 4},  # a 9-character prompt: longer than the window
        {"attention_window": 4},
        {"position": "rope", "attention_window": 4, "full_attention_layers": 1},
    ],
)
def test_kv_cache_matches_full_forward_for_either_architecture(arch):
    model = tiny_gpt(**arch)
    if model.token_shift is not None:  # starts at 0 (a no-op): make it matter
        torch.nn.init.normal_(model.token_shift, std=0.5, generator=torch.Generator().manual_seed(10))
    idx = torch.randint(V, (2, 16), generator=torch.Generator().manual_seed(8))
    full, _ = model(idx)
    last, cache = prefill(model, idx[:, :9])
    assert torch.allclose(last, full[:, 8], atol=1e-5)
    for t in range(9, 16):
        last, cache = extend(model, idx[:, t : t + 1], cache)
        assert torch.allclose(last, full[:, t], atol=1e-5)


def test_one_layer_rope_cache_slides_exactly_like_recomputing_the_last_block():
    # Past block_size the lecture re-runs the last block_size characters; a 1-layer RoPE model's
    # sliding cache holds exactly those keys and values, so the logits agree.
    model = tiny_gpt(position="rope", n_layer=1, block_size=8)
    idx = torch.randint(V, (1, 30), generator=torch.Generator().manual_seed(9))
    last, cache = prefill(model, idx[:, :8])
    for t in range(8, 30):
        last, cache = extend(model, idx[:, t : t + 1], cache)
        recomputed, _ = model(idx[:, t - 7 : t + 1])
        assert torch.allclose(last, recomputed[:, -1], atol=1e-5), t


def test_token_shift_against_an_explicit_previous_character_sum():
    model = tiny_gpt(token_shift=True)
    assert torch.equal(model.token_shift, torch.zeros(32))  # starts as the lecture's embedding
    gain = torch.randn(32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        model.token_shift.copy_(gain)
    idx = torch.randint(V, (2, 7), generator=torch.Generator().manual_seed(12))
    emb, pos = model.token_embedding_table.weight, model.position_embedding_table.weight
    for b in range(2):
        for t in range(7):
            expected = emb[idx[b, t]] + pos[t] + (gain * emb[idx[b, t - 1]] if t > 0 else 0)
            assert torch.allclose(model._embed(idx, 0)[b, t], expected, atol=1e-6), (b, t)


def test_token_shift_trains_and_changes_the_output():
    model = tiny_gpt(token_shift=True).train()
    idx = torch.randint(V, (4, 16), generator=torch.Generator().manual_seed(13))
    _, loss = model(idx, torch.roll(idx, -1, 1))
    loss.backward()
    assert model.token_shift.grad is not None and model.token_shift.grad.abs().sum() > 0













def test_a_window_as_long_as_the_text_is_the_causal_attention():
    idx = torch.randint(V, (2, 16), generator=torch.Generator().manual_seed(15))
    assert torch.equal(tiny_gpt(attention_window=16)(idx)[0], tiny_gpt()(idx)[0])
    assert not torch.allclose(tiny_gpt(attention_window=4)(idx)[0], tiny_gpt()(idx)[0])


def test_full_attention_layers_attend_to_the_whole_block():
    # 2 layers of window 4, the last one full: position 20 reads position 0, and the first layer keeps
    # its window (both layers full is the plain causal model, and differs).
    idx = torch.randint(V, (1, 32), generator=torch.Generator().manual_seed(16))
    model = tiny_gpt(position="rope", attention_window=4, full_attention_layers=1, block_size=32)
    assert [block.attn.window for block in model.blocks] == [4, 0]
    assert model.receptive_field == 32
    assert KVCache(model.config, 1, idx.device, torch.float32).capacities == (4, 32)
    base, _ = model(idx)
    other = idx.clone()
    other[0, 0] = (other[0, 0] + 1) % V
    assert not torch.allclose(model(other)[0][0, 20], base[0, 20], atol=1e-6)
    causal = tiny_gpt(position="rope", block_size=32)(idx)[0]
    all_full = tiny_gpt(position="rope", attention_window=4, full_attention_layers=2, block_size=32)
    assert torch.equal(all_full(idx)[0], causal)
    assert not torch.allclose(base, causal, atol=1e-4)


def test_a_windowed_model_sees_exactly_n_layer_windows_back():
    # 2 layers of window 4: position 20 reads positions 20 - 2 * 3 = 14 to 20, and nothing before.
    model = tiny_gpt(position="rope", attention_window=4, block_size=32)
    idx = torch.randint(V, (1, 32), generator=torch.Generator().manual_seed(16))
    base, _ = model(idx)
    for changed_at, seen in ((13, False), (14, True)):
        other = idx.clone()
        other[0, changed_at] = (other[0, changed_at] + 1) % V
        logits, _ = model(other)
        assert torch.allclose(logits[0, 20], base[0, 20], atol=1e-6) != seen, changed_at


def test_windowed_rope_cache_slides_exactly_like_recomputing_the_last_block():
    # With a window, the characters a prediction reads (n_layer * (window - 1) back) all lie inside
    # the last block_size, so the lecture's recompute of that block and the sliding cache (which
    # holds one window per layer) compute the same thing, for any number of layers.
    model = tiny_gpt(position="rope", qk_norm=True, mlp="relu2", n_layer=3, attention_window=4, block_size=12)
    assert model.config.n_layer * (model.config.attention_window - 1) < model.config.block_size
    idx = torch.randint(V, (2, 60), generator=torch.Generator().manual_seed(17))
    last, cache = prefill(model, idx[:, :12])
    assert cache.capacities == (4, 4, 4)  # all a new token can see
    for t in range(12, 60):
        last, cache = extend(model, idx[:, t : t + 1], cache)
        recomputed, _ = model(idx[:, t - 11 : t + 1])
        assert torch.allclose(last, recomputed[:, -1], atol=1e-5), t














def test_the_default_window_lets_generation_slide_exactly():
    # The sliding KV cache equals the lecture's recompute when everything a prediction reads,
    # n_layer * (window - 1) characters back, fits in block_size: keep params.yaml's GPT that way.
    from pathlib import Path

    from charlm.params import load_params

    gpt = load_params(Path(__file__).resolve().parent.parent / "params.yaml").gpt.model
    assert gpt.position == "rope" and 0 < gpt.attention_window < gpt.block_size
    assert gpt.n_layer * (gpt.attention_window - 1) < gpt.block_size
