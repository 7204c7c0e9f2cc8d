import random

from speedtune.training import layout


def test_rows_layout_is_gradient_accumulation():
    assert layout.by_rows([5, 9, 3, 7, 1, 2], 2) == [[0, 1], [2, 3], [4, 5]]


def test_tokens_layout_covers_every_row_once_within_the_budget():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(20, 800) for _ in range(rng.randint(1, 16))]
        budget = rng.choice([800, 1024, 2048, 8192])
        groups = layout.by_tokens(lengths, budget)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= budget
            assert [lengths[i] for i in g] == sorted((lengths[i] for i in g), reverse=True)


def test_tokens_layout_trades_padding_against_passes():
    short = [100, 110, 120, 130, 90, 95, 105, 115]
    assert len(layout.by_tokens(short, 8192)) == 1  # similar rows: one pass
    mixed = [2000, 60, 50, 70, 40, 65, 55, 45]
    groups = layout.by_tokens(mixed, 16384)
    assert [len(g) for g in groups] == [1, 7]  # one long row alone beats padding seven short ones to 2000
    assert layout.padded_tokens(mixed, groups) < layout.padded_tokens(mixed, [list(range(8))])
    assert len(layout.by_tokens([700] * 8, 1400)) == 4  # the budget holds two rows of 700


def test_padding_to_a_multiple_is_counted():
    groups = [[0, 1], [2]]
    assert layout.padded_tokens([100, 90, 30], groups) == 2 * 100 + 30
    assert layout.padded_tokens([100, 90, 30], groups, 64) == 2 * 128 + 64
    assert layout.round_up(128, 64) == 128 and layout.round_up(129, 64) == 192 and layout.round_up(7, None) == 7


def test_padding_free_groups_cost_their_real_tokens():
    """Packed into one sequence, a group costs its real tokens: mixed lengths no longer split for padding's sake,
    and the budget bounds a group's sum (a row longer than it still runs alone)."""
    mixed = [2000, 60, 50, 70, 40, 65, 55, 45]
    assert [sorted(g) for g in layout.by_tokens(mixed, 16384, packed=True)] == [list(range(8))]
    assert layout.padded_tokens(mixed, [list(range(8))], packed=True) == sum(mixed)
    assert layout.padded_tokens(mixed, [[0], list(range(1, 8))], 256, packed=True) == 2048 + 512  # a recorded width
    groups = layout.by_tokens([700] * 7 + [3000], 2100, packed=True)
    assert sorted(len(g) for g in groups) == [1, 1, 3, 3] and all(
        len(g) == 1 or 700 * len(g) <= 2100 for g in groups)
    assert sorted(i for g in groups for i in g) == list(range(8))
