"""Dynamic evaluation (charlm.evaluation.dynamic_loss): scored before learned from, adapting, and
leaving the model as it found it."""

import pytest
import torch
import torch.nn.functional as F

from charlm.evaluation import dynamic_loss
from charlm.params import EvaluateParams, ParamsError
from tests import helpers

V = 11


def model():
    return helpers.tiny_gpt(V, block_size=16, position="rope", attention_window=4)


def scored_in_order(net, data, block_size, segment, temperature=1.0):
    """The loss of each segment with `block_size - segment` characters of context, no learning, of
    the logits divided by `temperature`."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data) - 1, segment):
            end = min(start + segment, len(data) - 1)
            first = max(0, start - (block_size - segment))
            logits, _ = net(data[first:end].long()[None])
            y = data[first + 1 : end + 1].long()
            scored = logits[0, start - first :] / temperature
            total += F.cross_entropy(scored, y[start - first :], reduction="sum").item()
            count += end - start
    return total / count


def test_without_learning_it_is_the_in_order_loss_with_context():
    data = torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    net = model()
    settings = EvaluateParams(dynamic_lr=0.0, dynamic_segment=6)
    assert dynamic_loss(net, data, 16, torch.device("cpu"), settings) == pytest.approx(
        scored_in_order(net, data, 16, 6), rel=1e-6
    )


def test_at_a_temperature_it_scores_the_logits_divided_by_it():
    data = torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    net = model()
    settings = EvaluateParams(dynamic_lr=0.0, dynamic_segment=6, temperature=1.7)
    tempered = dynamic_loss(net, data, 16, torch.device("cpu"), settings)
    assert tempered == pytest.approx(scored_in_order(net, data, 16, 6, temperature=1.7), rel=1e-6)
    assert tempered != pytest.approx(scored_in_order(net, data, 16, 6), rel=1e-3)


def test_it_adapts_to_a_text_that_repeats_and_restores_the_weights():
    pattern = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(1))
    data = pattern.repeat(40)  # a text the model never trained on, then again and again
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    static = dynamic_loss(net, data, 16, torch.device("cpu"), EvaluateParams(dynamic_lr=0.0, dynamic_segment=8))
    adapted = dynamic_loss(net, data, 16, torch.device("cpu"), EvaluateParams(dynamic_lr=0.1, dynamic_segment=8))
    assert adapted < static - 0.5
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    again = dynamic_loss(net, data, 16, torch.device("cpu"), EvaluateParams(dynamic_lr=0.1, dynamic_segment=8))
    assert again == adapted  # deterministic, and nothing carried over from the previous call


def test_a_step_too_large_is_one_line_naming_the_key_and_the_weights_come_back():
    from charlm.errors import NonFiniteLoss

    data = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(1)).repeat(40)
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(NonFiniteLoss, match=r"^dynamic evaluation diverged: evaluate.dynamic_lr = 0.9 makes") as e:
        dynamic_loss(net, data, 16, torch.device("cpu"), EvaluateParams(dynamic_lr=0.9, dynamic_segment=8))
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_every_character_is_scored_before_the_model_learns_from_it():
    # Uniformly random characters cannot be predicted: any causal predictor loses about log(V) per
    # character on them. A model that learned from a segment before scoring it would memorise it
    # and score far below that with a large step.
    import math

    data = torch.randint(0, V, (600,), generator=torch.Generator().manual_seed(2))
    loss = dynamic_loss(model(), data, 16, torch.device("cpu"), EvaluateParams(dynamic_lr=0.5, dynamic_segment=8))
    assert loss > math.log(V) - 0.1


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("dynamic_lr", -0.1, "evaluate.dynamic_lr = -0.1: must be in [0, 1)"),
        ("dynamic_decay", 2.0, "evaluate.dynamic_decay = 2.0: must be in [0, 1]"),
        ("dynamic_segment", 0, "evaluate.dynamic_segment = 0: must be in [1, 1000000]"),
        ("temperature", 0.0, "evaluate.temperature = 0.0: must be in (0, 100]"),
        ("temperature", float("nan"), "evaluate.temperature = nan: must be in (0, 100]"),
    ],
)
def test_bad_settings_name_the_key(key, value, message):
    with pytest.raises(ParamsError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        EvaluateParams(**{key: value})


@pytest.mark.parametrize("token_shift", [False, True])
def test_the_receptive_field_is_exactly_what_reaches_a_prediction(token_shift):
    # dynamic_loss reads no context beyond it; a character one further back must change nothing.
    net = helpers.tiny_gpt(V, block_size=32, position="rope", attention_window=4, token_shift=token_shift)
    if token_shift:
        with torch.no_grad():
            net.token_shift.fill_(0.5)
    field = net.receptive_field
    assert field == net.config.n_layer * 3 + 1 + int(token_shift) < 32
    x = torch.randint(0, V, (1, 32), generator=torch.Generator().manual_seed(2))

    def last_logits(changed_at):
        x2 = x.clone()
        x2[0, changed_at] = (x2[0, changed_at] + 1) % V
        with torch.no_grad():
            return net(x2)[0][0, -1]

    with torch.no_grad():
        original = net(x)[0][0, -1]
    assert torch.allclose(last_logits(32 - field - 1), original, atol=1e-6)
    assert not torch.allclose(last_logits(32 - field), original, atol=1e-4)
