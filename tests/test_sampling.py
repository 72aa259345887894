import pytest
import torch

from charlm.models import build_model
from charlm.sampling import generate, prompt_ids, sample_next
from charlm.tokenizer import CharTokenizer, UnknownCharactersError
from tests import helpers

V = 30


def tiny_gpt(block_size=16, **arch):
    return helpers.tiny_gpt(V, block_size=block_size, **arch)


def test_generation_length_is_max_new_tokens():
    model = tiny_gpt()
    out = generate(model, torch.zeros(2, 3, dtype=torch.long), 40, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 43)


def test_temperature_zero_is_argmax_and_deterministic():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    ids = sample_next(logits, 0.0, 0, torch.Generator().manual_seed(0))
    assert ids.tolist() == [[1], [0]]
    model = tiny_gpt()
    a = generate(
        model, torch.zeros(1, 1, dtype=torch.long), 20, temperature=0, generator=torch.Generator().manual_seed(1)
    )
    b = generate(
        model, torch.zeros(1, 1, dtype=torch.long), 20, temperature=0, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(a, b)


def test_top_k_only_draws_from_the_k_likeliest():
    logits = torch.arange(10.0).repeat(500, 1)  # token 9 likeliest, then 8, 7...
    ids = sample_next(logits, 5.0, 3, torch.Generator().manual_seed(0))
    assert set(ids.flatten().tolist()) == {7, 8, 9}


def test_same_seed_same_text_other_seed_other_text():
    model = tiny_gpt()
    start = torch.zeros(1, 1, dtype=torch.long)
    a = generate(model, start, 50, generator=torch.Generator().manual_seed(5))
    b = generate(model, start, 50, generator=torch.Generator().manual_seed(5))
    c = generate(model, start, 50, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_kv_cache_gives_the_lecture_loop_tokens_while_context_fits():
    model = tiny_gpt(block_size=32)
    start = torch.tensor([[1, 2, 3]])
    cached = generate(model, start, 29, generator=torch.Generator().manual_seed(7), use_cache=True)
    plain = generate(model, start, 29, generator=torch.Generator().manual_seed(7), use_cache=False)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("arch", [{}, {"attention_window": 4}, {"attention_window": 4, "position": "rope"}])
def test_kv_cache_past_block_size_keeps_going(arch):
    # Learned positions re-prefill past block_size, also when the cache holds only a window.
    model = tiny_gpt(block_size=8, **arch)
    out = generate(model, torch.tensor([[1]]), 50, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 51)


def test_windowed_kv_cache_gives_the_lecture_loop_tokens_past_block_size():
    # n_layer * (window - 1) = 6 < block_size 8: the sliding cache reads what the recompute reads.
    model = tiny_gpt(block_size=8, attention_window=4, position="rope")
    start = torch.tensor([[1, 2, 3]])
    cached = generate(model, start, 40, generator=torch.Generator().manual_seed(8), use_cache=True)
    plain = generate(model, start, 40, generator=torch.Generator().manual_seed(8), use_cache=False)
    assert torch.equal(cached, plain)


def test_bigram_generation_reads_only_the_last_token():
    torch.manual_seed(0)
    model = build_model("bigram", {"vocab_size": V}).eval()
    calls = []
    original = model.forward
    model.forward = lambda idx, targets=None: (calls.append(idx.shape[1]), original(idx, targets))[1]
    generate(model, torch.zeros(1, 5, dtype=torch.long), 10, generator=torch.Generator().manual_seed(0))
    assert calls == [1] * 10


def test_prompt_ids():
    tok = CharTokenizer.fit("ab\ncd")
    assert prompt_ids(tok, "") == ([0], [])  # empty prompt starts from "\n"
    assert prompt_ids(tok, "abc") == ([1, 2, 3], [])
    with pytest.raises(UnknownCharactersError, match="'z'"):
        prompt_ids(tok, "azb")
    assert prompt_ids(tok, "azb", drop_unknown=True) == ([1, 2], ["z"])


def test_many_samples_are_one_batch_and_sample_i_does_not_depend_on_how_many():
    import dataclasses

    from charlm.checkpoint import Checkpoint
    from charlm.params import SampleParams
    from charlm.sampling import format_samples, sample_text
    from tests.helpers import cpu_runtime

    model = tiny_gpt(position="rope", attention_window=4)
    tok = CharTokenizer(("\n",) + tuple(chr(ord("a") + i) for i in range(V - 1)))
    ckpt = Checkpoint("gpt", dataclasses.asdict(model.config), model.state_dict(), tok)
    runtime = cpu_runtime(sample_precision="float32")
    texts = {
        n: sample_text(ckpt, SampleParams(prompt="ab", max_new_tokens=30, num_samples=n), runtime, seed=7).texts
        for n in (1, 3, 5)
    }
    assert [len(t) for t in texts[5]] == [32] * 5
    assert texts[3] == texts[5][:3] and texts[1] == texts[5][:1]  # each stream its own seeded randomness
    assert len(set(texts[5])) == 5  # and the streams differ
    assert format_samples(texts[1]) == texts[1][0]  # one sample: the text as it always was
    joined = format_samples(texts[3])
    assert joined.startswith("===== sample 1 of 3 =====\nab") and joined.count("===== sample") == 3


ARCHS = [
    {},  # the lecture's: learned positions, GELU, full attention
    {"position": "rope", "qk_norm": True, "mlp": "relu2", "logit_softcap": 10.0, "attention_window": 4},
    {"position": "rope", "token_shift": True},
    {"position": "rope", "qk_norm": False, "attention_window": 4, "zero_init": True},
    {"qk_norm": True, "bias": False, "logit_softcap": 5.0},
    {"position": "rope", "qk_norm": True, "mlp": "relu2", "attention_window": 4, "full_attention_layers": 1},
]


def randomised(model):
    """Weights far from the init (zero-initialised projections included), so every op matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_the_decode_step_gives_the_models_logits(arch, weights):
    from charlm.models.gpt.decode import DecodeStep
    from charlm.quantize import quantize_int8
    from charlm.sampling import KVCache
    from tests.helpers import cpu_runtime

    torch.manual_seed(0)
    model = randomised(tiny_gpt(block_size=16, **arch))
    if weights == "int8":
        model = quantize_int8(model, cpu_runtime().int8_activations)
    caches = [KVCache(model.config, 3, torch.device("cpu"), torch.float32) for _ in range(2)]
    prompt = torch.randint(0, V, (3, 5))
    with torch.inference_mode():
        for cache in caches:
            model(prompt, kv_cache=cache)
        step = DecodeStep(model)
        steps = 11 if arch.get("position", "learned") == "learned" else 30  # RoPE slides past block_size
        for _ in range(steps):
            ids = torch.randint(0, V, (3,))
            fast = step(ids, caches[0])
            reference = model(ids[:, None], kv_cache=caches[1])[0][:, -1]
            if weights == "float32":
                torch.testing.assert_close(fast, reference, rtol=1e-5, atol=2e-5)
            else:  # the int8 kernel rounds its inputs to bf16: one ulp (2^-8) there moves the logits
                torch.testing.assert_close(fast, reference, rtol=0.02, atol=0.02 * float(reference.abs().max()))


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_generation_gives_the_eager_tokens(arch):
    # Three streams, each with its own generator, well past block_size (learned positions re-prefill).
    model = randomised(tiny_gpt(block_size=16, **arch))
    start = torch.tensor([[1, 2], [3, 4], [5, 6]])

    def run(fast, top_k=0, temperature=1.0):
        generators = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
        return generate(model, start, 80, temperature, top_k, generators, fast=fast)

    assert torch.equal(run(True), run(False))
    assert torch.equal(run(True, top_k=5, temperature=0.7), run(False, top_k=5, temperature=0.7))


needs_compiler = pytest.mark.skipif(
    __import__("charlm.hardware", fromlist=["cxx_compiler"]).cxx_compiler() is None, reason="no C++ compiler"
)


@needs_compiler
@pytest.mark.parametrize("arch", ARCHS)
def test_the_compiled_decode_step_gives_the_eager_tokens(arch):
    # The fixed-shape step, compiled to C++: the same tokens as the eager step, past the attention
    # window (the cache slides) and past block_size (learned positions re-prefill a new cache).
    model = randomised(tiny_gpt(block_size=16, **arch))
    start = torch.tensor([[1, 2], [3, 4], [5, 6]])

    def run(compiled):
        generators = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
        return generate(model, start, 40, 0.8, 0, generators, compiled=compiled)

    assert torch.equal(run(True), run(False))


def test_a_failing_compiler_costs_one_line_and_not_the_text(monkeypatch, capsys):
    from charlm.models.gpt.decode import DecodeStep

    def broken(self, cache):
        raise RuntimeError("C++ compile error\nlong compiler output")

    monkeypatch.setattr(DecodeStep, "compiled", broken)
    model = randomised(tiny_gpt(block_size=16, position="rope"))
    start = torch.tensor([[1, 2]])
    eager = generate(model, start, 20, generator=torch.Generator().manual_seed(1))
    capsys.readouterr()
    fallback = generate(model, start, 20, generator=torch.Generator().manual_seed(1), compiled=True)
    assert torch.equal(fallback, eager)
    err = capsys.readouterr().err
    assert err.count("compiling the decode step failed (RuntimeError: C++ compile error); generating eagerly") == 1
    assert "long compiler output" not in err


def test_compiling_is_for_the_cpu_with_a_compiler_and_auto_for_long_jobs(monkeypatch):
    from charlm import hardware, sampling
    from tests.helpers import cpu_runtime

    monkeypatch.setattr(hardware, "cxx_compiler", lambda: "/usr/bin/g++")
    assert hardware.compiles_decoding("cpu", "auto") == "auto"
    assert hardware.compiles_decoding("cpu", True) is True
    assert hardware.compiles_decoding("cpu", False) is False
    assert hardware.compiles_decoding("cuda", True) is False
    assert hardware.compiles_decoding("mps", "auto") is False
    monkeypatch.setattr(hardware, "cxx_compiler", lambda: None)
    assert hardware.compiles_decoding("cpu", True) is False
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "/nonexistent/c++")  # the user's compiler, which is not there
    assert hardware.cxx_compiler() is None
    monkeypatch.setenv("PATH", "")  # and no compiler on the PATH
    monkeypatch.delenv("CXX")
    assert hardware.cxx_compiler() is None

    model = randomised(tiny_gpt(block_size=16, position="rope"))
    runtime = cpu_runtime()
    monkeypatch.setattr(sampling, "seconds_per_step", lambda *a, **k: 0.001)  # 1 ms a step
    assert not sampling.worth_compiling(model, runtime, batch=4, max_new_tokens=500)  # 0.5 s
    assert sampling.worth_compiling(model, runtime, batch=4, max_new_tokens=100_000)  # 100 s


@needs_compiler
def test_sample_text_compiles_when_asked_and_auto_leaves_a_short_job_eager():
    import dataclasses

    from charlm.checkpoint import Checkpoint
    from charlm.params import SampleParams
    from charlm.sampling import sample_text
    from tests.helpers import cpu_runtime

    model = randomised(tiny_gpt(block_size=16, position="rope", attention_window=4))
    tokenizer = CharTokenizer(("\n",) + tuple(chr(ord("a") + i) for i in range(V - 1)))
    ckpt = Checkpoint("gpt", dataclasses.asdict(model.config), model.state_dict(), tokenizer)
    settings = SampleParams(prompt="abc", max_new_tokens=60, num_samples=3, precision="float32")
    runtime = cpu_runtime(sample_precision="float32")
    auto = sample_text(ckpt, settings, runtime, seed=5)
    forced = sample_text(ckpt, settings, dataclasses.replace(runtime, sample_compile=True), seed=5)
    assert (auto.compiled, forced.compiled) == (False, True)
    assert forced.texts == auto.texts


@pytest.mark.parametrize("per_stream", [False, True])
def test_the_sampler_draws_torch_multinomials_tokens(per_stream):
    # The sampler's vectorised draw against torch.multinomial on the same generators, step by step,
    # over more steps than one block of pre-drawn numbers.
    from charlm.sampling import TokenSampler

    B, steps = 4, 700
    logits = torch.randn(steps, B, V, generator=torch.Generator().manual_seed(0)) * 3

    def generators():
        if per_stream:
            return [torch.Generator().manual_seed(10 + i) for i in range(B)]
        return torch.Generator().manual_seed(10)

    sampler, reference = TokenSampler(1.0, 0, generators(), B), generators()
    for step_logits in logits:
        probs = torch.softmax(step_logits, dim=-1)
        if per_stream:
            pairs = zip(probs, reference, strict=True)
            expected = torch.cat([torch.multinomial(p[None], 1, generator=g) for p, g in pairs])
        else:
            expected = torch.multinomial(probs, 1, generator=reference)
        assert torch.equal(sampler(step_logits), expected)


def test_auto_weights_are_the_faster_measured(monkeypatch):
    import time

    from charlm.models.gpt import decode
    from charlm.quantize import Int8Linear
    from charlm.sampling import faster_weights
    from tests.helpers import cpu_runtime

    model = randomised(tiny_gpt(block_size=16, position="rope", attention_window=4))
    runtime = cpu_runtime()
    original_forward, original_as_linear = Int8Linear.forward, decode.as_linear

    def slow_int8(self, x):
        time.sleep(0.002)
        return original_forward(self, x)

    def slow_float32(module, scale=1.0):
        call = original_as_linear(module, scale)
        if not isinstance(module, torch.nn.Linear):
            return call
        return lambda x: (time.sleep(0.002), call(x))[1]

    with monkeypatch.context() as m:
        m.setattr(Int8Linear, "forward", slow_int8)
        assert faster_weights(model, runtime, batch=1) == "float32"
    with monkeypatch.context() as m:
        m.setattr(decode, "as_linear", slow_float32)
        assert faster_weights(model, runtime, batch=1) == "int8"
