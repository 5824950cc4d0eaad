"""TRL's unpaired preference form (prompt, completion, label), what KTO learns from: pairs split into a
desirable and an undesirable row, and the loss weights the data's balance of the two calls for."""

import json

from datasets import Dataset, concatenate_datasets


def unpair(rows: Dataset, seed: int) -> tuple[Dataset, int]:
    """(rows, repeats dropped): each pair as two rows, its chosen answer (label true) and its rejected one
    (false), as TRL's `unpair_preference_dataset` writes them, less the rows that repeat an earlier one
    (pairs that share a prompt and an answer: format thumbs drops the same repeats), in an order drawn
    with `seed`. KTO reads rows in order (its train_sampling_strategy is sequential) and takes each row's
    KL answer from its neighbour in the batch: TRL's order (every chosen row, then every rejected one)
    gives batches of one label, and a pair's two rows side by side give half the rows their own prompt's
    other answer as the KL sample."""
    sides = [
        rows.remove_columns(other).rename_column(side, "completion").add_column("label", [label] * len(rows))
        for side, other, label in (("chosen", "rejected", True), ("rejected", "chosen", False))
    ]
    both = concatenate_datasets(sides)
    keys = (json.dumps(key) for key in zip(both["prompt"], both["completion"], both["label"], strict=True))
    seen, first = set(), []
    for i, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            first.append(i)
    return both.select(first).shuffle(seed=seed), len(both) - len(first)


def weights(labels: list[bool]) -> dict:
    """KTO's desirable and undesirable loss weights for this balance of labels: Ethayarajh et al. 2024
    (arXiv:2402.01306, eq. 8), as TRL's KTOTrainer checks them, want desirable_weight * desirable rows /
    (undesirable_weight * undesirable rows) in [1, 4/3]. Where it falls outside, the scarcer label's
    weight is raised to bring it to 1; else both stay 1."""
    desirable = sum(map(bool, labels))
    undesirable = len(labels) - desirable
    out = {
        "desirable": desirable,
        "undesirable": undesirable,
        "desirable_weight": 1.0,
        "undesirable_weight": 1.0,
    }
    if desirable and undesirable and not 1 <= desirable / undesirable <= 4 / 3:
        scarcer = "desirable_weight" if desirable < undesirable else "undesirable_weight"
        out[scarcer] = max(desirable, undesirable) / min(desirable, undesirable)
    return out


def in_range(balance: dict) -> bool:
    """Whether the weights in `balance` (weights()'s keys) meet the rule weights() describes."""
    d, u = balance["desirable"], balance["undesirable"]
    if not d or not u:
        return True
    ratio = balance["desirable_weight"] * d / (balance["undesirable_weight"] * u)
    return 1 - 1e-9 <= ratio <= 4 / 3 + 1e-9
