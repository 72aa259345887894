"""Streaming encode/split: chunk boundaries, wide vocabularies, bounded memory."""

import io
import os
import subprocess
import sys

import pytest

from charlm.corpus import encode_file, fit_vocabulary, iter_text
from charlm.errors import DataError
from charlm.tokenizer import CharTokenizer
from tests.helpers import ROOT


def test_multibyte_characters_split_across_chunks_stay_whole(tmp_path):
    text = "héllo wörld → ✓ " * 50
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    assert "".join(iter_text(path, chunk_bytes=7)) == text  # 7 bytes cuts through many characters
    tok = fit_vocabulary(path, chunk_bytes=5)
    assert tok == CharTokenizer.fit(text)
    out = io.BytesIO()
    assert encode_file(path, tok, out, chunk_bytes=3) == len(text)
    assert list(out.getvalue()) == tok.encode(text)


def test_invalid_utf8_names_the_byte(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"abc" * 10 + b"\xff" + b"abc")
    with pytest.raises(DataError, match="byte 30"):
        fit_vocabulary(path, chunk_bytes=4)
    path.write_bytes(b"abc\xe2\x82")  # cut inside a 3-byte character at the end of the file
    with pytest.raises(DataError, match="not UTF-8"):
        fit_vocabulary(path)


def test_empty_corpus(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        fit_vocabulary(path)


def run_stage(name, *args, cwd):
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", f"stages.{name}", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )


def test_more_than_256_characters_switch_to_int16_through_the_stages(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(400)) * 20 + "\n"
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    (tmp_path / "params.yaml").write_text("split:\n  val_fraction: 0.25\n")
    run_stage("encode", "--text", "input.txt", "--vocab", "vocab.json", "--tokens", "tokens.bin", cwd=tmp_path)
    run_stage(
        "split",
        "--tokens",
        "tokens.bin",
        "--vocab",
        "vocab.json",
        "--train",
        "train.bin",
        "--val",
        "val.bin",
        cwd=tmp_path,
    )
    tok = CharTokenizer.load(tmp_path / "vocab.json")
    assert tok.vocab_size == 401 and tok.dtype == "int16"
    n = len(text)
    assert (tmp_path / "tokens.bin").stat().st_size == 2 * n
    assert (tmp_path / "train.bin").stat().st_size == 2 * int(n * 0.75)
    assert (tmp_path / "train.bin").read_bytes() + (tmp_path / "val.bin").read_bytes() == (
        tmp_path / "tokens.bin"
    ).read_bytes()

    from charlm.batches import load_tokens

    assert tok.decode(load_tokens(tmp_path / "val.bin", tok.dtype).tolist()) == text[int(n * 0.75) :]


@pytest.mark.slow
def test_a_large_corpus_encodes_and_splits_in_bounded_memory(tmp_path):
    """300 MB of text through encode and split: each stage's peak memory stays far below the corpus size."""
    line = ("First Citizen: Before we proceed any further, hear me speak. " * 4 + "\n").encode()
    with open(tmp_path / "input.txt", "wb") as f:
        for _ in range(300 * (1 << 20) // len(line)):
            f.write(line)
    (tmp_path / "params.yaml").write_text("")
    # Run each stage in a wrapper that reports the stage process's own peak RSS after it exits: VmHWM,
    # the high-water mark of this program's memory, which (unlike ru_maxrss) does not start at the
    # RSS of the test process it was spawned from.
    measure = (
        "import re, runpy, sys\n"
        "sys.argv = sys.argv[1:]\n"
        "try:\n    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "status = open('/proc/self/status').read()\n"
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', status).group(1)) // 1024)\n"
    )
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    peaks = {}
    for name, args in [
        ("encode", ["--text", "input.txt", "--vocab", "vocab.json", "--tokens", "tokens.bin"]),
        ("split", ["--tokens", "tokens.bin", "--vocab", "vocab.json", "--train", "train.bin", "--val", "val.bin"]),
    ]:
        proc = subprocess.run(
            [sys.executable, "-c", measure, f"stages.{name}", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[name] = int(proc.stdout.strip().splitlines()[-1])
    assert (tmp_path / "tokens.bin").stat().st_size == (tmp_path / "input.txt").stat().st_size
    assert all(peak < 200 for peak in peaks.values()), peaks  # MB, for a 300 MB corpus
