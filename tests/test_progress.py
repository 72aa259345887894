import io

import torch

from charlm.curves import CurvePoint
from charlm.progress import Progress


def test_piped_output_is_plain_flushed_lines():
    out = io.StringIO()
    progress = Progress("gpt", stream=out, tty=False, log_every=0.0)
    for step in range(1, 4):
        progress.on_progress(step, 3, torch.tensor(2.5), 1000.0)
    progress.on_eval(CurvePoint.without_average(3, 2.4, 2.6))
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[0].startswith("gpt step 1/3 loss 2.5000 | 1,000 tok/s | eta")
    assert lines[-1] == "gpt step 3: train loss 2.4000, val loss 2.6000 (estimates)"


def test_terminal_gets_a_bar_that_redraws_in_place():
    out = io.StringIO()
    progress = Progress("gpt", stream=out, tty=True, bar_every=0.0)
    for step in range(1, 11):
        progress.on_progress(step, 10, torch.tensor(1.0), 500.0)
    text = out.getvalue()
    assert text.count("\r[") == 10 and "[##############################] gpt step 10/10" in text
    assert text.endswith("\n")


def test_piped_output_is_rate_limited():
    out = io.StringIO()
    progress = Progress("bigram", stream=out, tty=False, log_every=3600.0)
    for step in range(1, 100):
        progress.on_progress(step, 100, None, 1.0)
    assert out.getvalue() == ""  # nothing until the interval passes or the last step
    progress.on_progress(100, 100, None, 1.0)
    assert out.getvalue().startswith("bigram step 100/100")


def test_an_evaluation_with_a_weight_average_shows_both_models():
    out = io.StringIO()
    Progress("gpt", stream=out, tty=False).on_eval(CurvePoint(200, 1.85, 1.95, 2.7, 2.78))
    assert out.getvalue() == (
        "gpt step 200: train loss 1.8500, val loss 1.9500 | weight average: train 2.7000, val 2.7800 (estimates)\n"
    )


def test_piped_lines_are_whole_lines_a_log_reader_can_follow():
    # What `dvc queue logs` shows: each status a line of its own, never a redrawn bar.
    out = io.StringIO()
    progress = Progress("gpt", stream=out, tty=False, log_every=0.0)
    for step in range(1, 6):
        progress.on_progress(step, 5, torch.tensor(2.0), 100.0)
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and len(lines) == 6
    assert all(line.startswith(f"gpt step {i}/5") for i, line in enumerate(lines[:-1], start=1))
