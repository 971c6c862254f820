"""Preference pairs from scored samples: the paper's walk over winners and losers."""

from __future__ import annotations

import random
from dataclasses import dataclass


def walk_and_wrap(winners: list, losers: list, k: int) -> list[tuple]:
    """Up to k (winner, loser) pairs, walking both lists in step and wrapping the shorter one.

    Stops after k pairs or once every winner and every loser has been used once,
    whichever comes first, so no pair repeats. An empty side gives no pairs.
    """
    if not winners or not losers:
        return []
    count = min(k, max(len(winners), len(losers)))
    return [(winners[i % len(winners)], losers[i % len(losers)]) for i in range(count)]


@dataclass
class PairStats:
    questions: int = 0
    pairs: int = 0
    dropped_all_correct: int = 0
    dropped_all_wrong: int = 0


def build_pairs(
    prompts: list[str],
    samples: list[list[str]],
    rewards: list[list[float]],
    k: int,
    gold_solutions: list[str | None] | None = None,
) -> tuple[list[dict], PairStats]:
    """Pairs for every question: rows with `prompt`, `chosen`, `rejected` and `question_index`.

    Winners are the samples with reward 1 (deduplicated, in sampling order), then the
    gold solution when given; losers the samples with reward 0. A question with no
    winner or no loser gives no pairs and is counted by why.
    """
    stats = PairStats(questions=len(prompts))
    pairs = []
    for index, (prompt, completions, scores) in enumerate(zip(prompts, samples, rewards, strict=True)):
        winners = list(dict.fromkeys(c for c, r in zip(completions, scores) if r > 0))
        losers = list(dict.fromkeys(c for c, r in zip(completions, scores) if r <= 0))
        gold = gold_solutions[index] if gold_solutions is not None else None
        if gold is not None and gold not in winners:
            winners.append(gold)
        if not losers:
            stats.dropped_all_correct += 1
        elif not winners:
            stats.dropped_all_wrong += 1
        for chosen, rejected in walk_and_wrap(winners, losers, k):
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "question_index": index})
    stats.pairs = len(pairs)
    return pairs, stats


def cap_pairs(pairs: list[dict], max_pairs: int | None, seed: int) -> tuple[list[dict], int]:
    """At most `max_pairs` of `pairs` (a seeded random subset, in their original order), and how many were dropped.

    The paper keeps a random ~60k when an iteration builds more (section 3.1, footnote 4). The
    subset depends on the number of pairs, `max_pairs` and `seed` only (its own generator, not
    the global one), so the same seed keeps the same pairs. `max_pairs` None keeps all.
    """
    if max_pairs is None or len(pairs) <= max_pairs:
        return list(pairs), 0
    if max_pairs < 1:
        raise ValueError(f"pairs.max_pairs must be a positive number or null, got {max_pairs}")
    kept = sorted(random.Random(seed).sample(range(len(pairs)), max_pairs))
    return [pairs[index] for index in kept], len(pairs) - max_pairs
