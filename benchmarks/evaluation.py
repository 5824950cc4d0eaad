"""Eval: `make eval`'s generation, batched (16 prompts at a time, padded on the left) against one prompt
at a time, on the tiny Llama and 64 toy eval prompts, greedy, up to 48 new tokens: prompts a second,
median of REPEATS (min-max). Both go through evaluate.answers; batch size is all that differs."""

import json
import statistics
import time
from types import SimpleNamespace

from dpo_recipes.after import evaluate, samples
from dpo_recipes.sources import tiny

PROMPTS, NEW_TOKENS, REPEATS = 64, 48, 3
BATCHES = {"one at a time": 1, "batched (16)": 16}


def run(repeats: int = REPEATS) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in (tiny.CORPUS / "eval.jsonl").read_text().splitlines()]
    prompts = [row["prompt"] for row in rows[:PROMPTS]]
    tokenizer = AutoTokenizer.from_pretrained(tiny.path())
    model = AutoModelForCausalLM.from_pretrained(tiny.path(), dtype=torch.float32).eval()
    timings, made = {name: [] for name in BATCHES}, {}
    for _ in range(repeats):  # alternating, so drift in the machine's speed falls on both
        for name, size in BATCHES.items():
            options = SimpleNamespace(temperature=0.0, max_new_tokens=NEW_TOKENS, batch_size=size, seed=0)
            decoding = samples.decoding_of(tokenizer, model, options)
            start = time.perf_counter()
            made[name] = evaluate.answers(model, tokenizer, prompts, options, decoding, model.device, name)
            timings[name].append(len(prompts) / (time.perf_counter() - start))
    return {
        "prompts": len(prompts),
        "max_new_tokens": NEW_TOKENS,
        "same_answers": made["one at a time"] == made["batched (16)"],
        "prompts_per_s": {name: sorted(values) for name, values in timings.items()},
    }


def table(result: dict) -> str:
    one = statistics.median(result["prompts_per_s"]["one at a time"])
    lines = ["| generation | prompts/s (median, min-max) | vs one at a time |", "| --- | --- | --- |"]
    for name, values in result["prompts_per_s"].items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.1f} ({min(values):.1f}-{max(values):.1f}) | {median / one:.2f}x |")
    same = "the same" if result["same_answers"] else "NOT the same"
    return "\n".join(lines) + (
        f"\n\n{result['prompts']} toy eval prompts, greedy, up to {result['max_new_tokens']} new tokens; "
        f"the two ways gave {same} answers."
    )
