"""Token counts: the ids of a prompt and its answer as a run tokenizes them (plain text or through the
chat template), and the lengths `make prep` reports, which the memory prediction reads back."""

import statistics
from pathlib import Path

from datasets import Dataset

from data_prep.convert import ANSWER_COLUMNS


def tokenizer_id(name: str) -> str:
    """A tokenizer as a report names it: a local folder by its absolute path, else the hub id."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def token_ids(tokenizer, prompt, answer=None) -> list[int]:
    """The ids of a prompt (ending with the generation prompt) or of a prompt and its answer, in either
    style: plain text, or messages through the chat template."""
    if isinstance(prompt, str):
        return tokenizer(prompt + (answer or ""))["input_ids"]
    messages, generation = (prompt, True) if answer is None else (prompt + answer, False)
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=generation, return_dict=True)
    return encoded["input_ids"]


def token_lengths(dataset: Dataset, tokenizer, max_length: int | None, num_proc: int | None = None) -> dict:
    """Token counts after the chat template (prompt, chosen, rejected; or prompt, completion for
    unpaired rows) and how many rows TRL would drop because the prompt alone reaches `max_length`."""
    sides = [k for k in ANSWER_COLUMNS if k in dataset.column_names]

    def lengths(row):
        prompt = len(token_ids(tokenizer, row["prompt"]))
        answers = {k + "_len": len(token_ids(tokenizer, row["prompt"], row[k])) - prompt for k in sides}
        return {"prompt_len": prompt, **answers}

    counted = dataset.map(
        lengths, remove_columns=dataset.column_names, num_proc=num_proc, desc="Counting tokens"
    )
    stats = {}
    for name in ("prompt", *sides):
        values = sorted(counted[name + "_len"])
        if values:
            stats[name] = {
                "min": values[0],
                "median": statistics.median(values),
                "p95": values[min(len(values) - 1, int(0.95 * len(values)))],
                "max": values[-1],
            }
    too_long = sum(n >= max_length for n in counted["prompt_len"]) if max_length else 0
    return {"token_lengths": stats, "max_length": max_length, "trl_would_drop": too_long}
