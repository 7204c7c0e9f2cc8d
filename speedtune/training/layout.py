"""How one optimizer step's rows become micro-batches. The step's rows (batch size x grad accum of them, the recipe)
never change; only how they are grouped for the forward and backward passes does, and the loss is normalised over
the whole step's trained tokens, so the gradient is the same whatever the grouping.

`rows`: fixed groups of `micro_batch` rows in order, each padded to its longest row: what transformers' gradient
accumulation does (the recipe as given). `tokens`: the rows sorted by length, cut into contiguous groups whose padded
size (rows x longest) stays within a token budget; among those cuts, the one with the least cost, where a group costs
its padded tokens plus a fixed per-pass overhead (the host's Python and kernel launches, dequantising 4-bit weights),
priced in tokens by the fit from the GPU's measured speed (speedtune.training.fit.pass_overhead_tokens). Rows of similar
length share a group, so little is padding, and short rows of a step run in one pass. Padding-free (`plan.padding_free`,
either layout): a group's rows run as one sequence, each row attending only to itself (speedtune.training.trainer), so a
group costs its real tokens and nothing is padding."""

from __future__ import annotations

PASS_OVERHEAD_TOKENS = 1024  # without a measured figure (a CPU: passes are cheap next to its arithmetic)


def by_rows(lengths: list[int], micro_batch: int) -> list[list[int]]:
    idx = list(range(len(lengths)))
    return [idx[i:i + micro_batch] for i in range(0, len(idx), micro_batch)]


def by_tokens(lengths: list[int], budget: int, overhead: int = PASS_OVERHEAD_TOKENS,
              packed: bool = False) -> list[list[int]]:
    """Row indices grouped into micro-batches (see the module's note). A row longer than the budget runs alone.
    `packed`: a group's rows run as one sequence without padding, so a group costs its real tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[k]: the cheapest cut of the first k sorted rows
    cut = [0] * (n + 1)
    for k in range(1, n + 1):
        size = 0
        for j in range(k - 1, -1, -1):  # the last group is order[j:k]; its longest row is order[j]
            size += lengths[order[j]]
            padded = size if packed else (k - j) * lengths[order[j]]
            if padded > budget and k - j > 1:
                break  # longer groups only get bigger
            cost = best[j] + padded + overhead
            if cost < best[k]:
                best[k], cut[k] = cost, j
    groups, k = [], n
    while k > 0:
        groups.append(order[cut[k]:k])
        k = cut[k]
    return groups[::-1]


def round_up(width: int, multiple: int | None) -> int:
    return -(-width // multiple) * multiple if multiple else width


def padded_tokens(lengths: list[int], groups: list[list[int]], multiple: int | None = None,
                  packed: bool = False) -> int:
    """Tokens computed, padding included (each group padded to its longest row, rounded up to `multiple`; a packed
    group is its real tokens, rounded up to `multiple` where a recorded pass needs a fixed width)."""
    if packed:
        return sum(round_up(sum(lengths[i] for i in g), multiple) for g in groups)
    return sum(len(g) * round_up(max(lengths[i] for i in g), multiple) for g in groups)
