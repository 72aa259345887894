import torch

from charlm.batches import get_batch, load_tokens, sequential_windows


def test_targets_are_inputs_shifted_by_one():
    data = torch.arange(200, dtype=torch.uint8)
    x, y = get_batch(data, 16, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (16, 8)
    assert x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # the data is 0, 1, 2, ...: every target is its input's successor


def test_same_seed_same_batch():
    data = torch.arange(200, dtype=torch.uint8)
    a = get_batch(data, 4, 8, torch.Generator().manual_seed(3))
    b = get_batch(data, 4, 8, torch.Generator().manual_seed(3))
    c = get_batch(data, 4, 8, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_sequential_windows_count_every_target_once():
    data = torch.arange(103, dtype=torch.uint8)
    seen = []
    for x, y in sequential_windows(data, block_size=10, batch_size=4):
        assert torch.equal(y, x + 1)
        seen += y.flatten().tolist()
    assert seen == list(range(1, 103))


def test_load_tokens_reads_raw_file(tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(bytes([3, 1, 2]))
    assert load_tokens(path, "uint8").tolist() == [3, 1, 2]
    path.write_bytes((513).to_bytes(2, "little") * 2)
    assert load_tokens(path, "int16").tolist() == [513, 513]
