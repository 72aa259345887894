import pytest
import torch

from charlm.batches import CONTEXT_ONLY, EpochBlocks, blocks_at, get_batch, load_tokens, sequential_blocks


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


def test_epoch_windows_hand_out_every_window_of_an_epoch_once_in_random_order():
    n_tokens, block_size = 203, 10
    windows = EpochBlocks(n_tokens, block_size, torch.Generator().manual_seed(0))
    offsets = set()
    for epoch in range(1, 4):
        first = windows.take(1)  # an empty queue: this begins the next epoch
        assert windows.epoch == epoch
        starts = torch.cat([first, windows.take(len(windows.queue))]).tolist()  # and this hands out the rest
        offset = min(starts)
        offsets.add(offset)
        assert offset < block_size
        # From its offset, the epoch cuts the split into every whole window (each needs block_size + 1 tokens).
        assert sorted(starts) == list(range(offset, n_tokens - block_size, block_size))
        assert starts != sorted(starts)  # shuffled
    assert len(offsets) > 1  # the window boundaries move between epochs


def test_epoch_windows_straddle_epochs_and_resume_from_their_state():
    def sampler(seed):
        return EpochBlocks(500, 16, torch.Generator().manual_seed(seed))

    whole = sampler(1)
    draws = [whole.take(7) for _ in range(12)]  # 84 windows: about three epochs of ~30
    assert whole.epoch >= 3
    again = sampler(1)
    state = None
    for i, expected in enumerate(draws):
        if i == 5:
            state = again.state_dict()
        assert torch.equal(again.take(7), expected)
    resumed = sampler(99)  # everything must come from the state
    resumed.load_state_dict(state)
    for expected in draws[5:]:
        assert torch.equal(resumed.take(7), expected)
    assert not torch.equal(torch.cat([sampler(2).take(7) for _ in range(3)]), torch.cat(draws[:3]))


def test_epoch_windows_fit_a_split_barely_longer_than_a_window():
    windows = EpochBlocks(12, 10, torch.Generator().manual_seed(0))
    starts = windows.take(50)
    data = torch.arange(12, dtype=torch.uint8)
    x, y = blocks_at(data, starts, 10)
    assert torch.equal(y, x + 1) and int(starts.max()) + 10 < 12


def test_sequential_windows_count_every_target_once():
    data = torch.arange(103, dtype=torch.uint8)
    seen = []
    for x, y in sequential_blocks(data, block_size=10, batch_size=4):
        assert torch.equal(y, x + 1)
        seen += y.flatten().tolist()
    assert seen == list(range(1, 103))


@pytest.mark.parametrize("length", [103, 104, 97, 11])
def test_overlapping_windows_score_every_target_once_each_with_its_context(length):
    data = torch.arange(length, dtype=torch.int64)
    seen = []
    for x, y in sequential_blocks(data, block_size=10, batch_size=4, context=4):
        for row_x, row_y in zip(x, y, strict=True):
            scored = row_y != CONTEXT_ONLY
            assert torch.equal(row_y[scored], row_x[scored] + 1)
            first = int(row_y[scored][0])  # the first target scored in this window
            assert first == 1 or int(scored.long().argmax()) == 4  # 4 characters of context before it
            seen += row_y[scored].tolist()
    assert seen == list(range(1, length))


def test_overlapping_windows_spread_over_a_split_score_each_target_at_most_once():
    data = torch.arange(1000, dtype=torch.int64)
    seen = [t for _, y in sequential_blocks(data, 10, 4, max_tokens=100, context=4) for t in y[y >= 0].tolist()]
    assert len(seen) == len(set(seen)) and 90 <= len(seen) <= 110


def test_load_tokens_reads_raw_file(tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(bytes([3, 1, 2]))
    assert load_tokens(path, "uint8").tolist() == [3, 1, 2]
    path.write_bytes((513).to_bytes(2, "little") * 2)
    assert load_tokens(path, "int16").tolist() == [513, 513]
