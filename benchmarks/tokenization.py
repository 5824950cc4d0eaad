"""Tokenization: rows/s of our data path vs TRL's `_prepare_dataset` on 20,000 synthetic UltraFeedback-
sized conversational rows (about 1,000 tokens per pair) with the tiny tokenizer and its chat template,
with 1 and 2 processes, and with a template that is not prefix-stable for two rows in three (their
rows are tokenized whole, the others take the fast path); the token ids must be identical. The rows are read from an Arrow file, as
training's converted data are (in memory, both paths would also pickle them to each worker)."""

import random
import statistics
import tempfile
import time

import datasets
from datasets import Dataset, load_from_disk
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer

from benchmarks.data_prep import text
from dpo_recipes.sources import tiny
from dpo_recipes.training import tokenize

ROWS = 20_000
# Like DeepSeek-R1's: the generation prompt opens a think block unless the conversation has a system turn.
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if messages[0]['role'] != 'system' %}<think>\n{% endif %}{% endif %}"
)
REPEATS = 3
COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def rows(n: int, directory: str) -> Dataset:
    """Every third row opens with a system turn."""
    rng = random.Random(0)
    turn = lambda role, words: [{"role": role, "content": text(rng, words)}]  # noqa: E731
    Dataset.from_list(
        [
            {
                "prompt": (turn("system", 8) if i % 3 == 0 else []) + turn("user", 40),
                "chosen": turn("assistant", 160),
                "rejected": turn("assistant", 160),
            }
            for i in range(n)
        ]
    ).save_to_disk(directory)
    return load_from_disk(directory)


def trl(dataset, tokenizer, procs):
    args = DPOConfig(
        "unused", use_cpu=True, bf16=False, max_length=2048, dataset_num_proc=procs, report_to="none"
    )
    return DPOTrainer._prepare_dataset(
        type("Host", (), {"_tokenizer": tokenizer})(), dataset, tokenizer, args, "train"
    )


def ours(dataset, tokenizer, procs):
    return tokenize.prepare(dataset, tokenizer, 2048, "keep_start", procs, "train")


def run(n: int = ROWS, repeats: int = REPEATS) -> dict:
    datasets.disable_caching()
    datasets.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(tiny.path())
    directory = tempfile.TemporaryDirectory()
    dataset = rows(n, directory.name)
    sample = trl(dataset.select(range(200)), tokenizer, None)
    tokens = statistics.mean(sum(len(r[c]) for c in COLUMNS) for r in sample)
    think = AutoTokenizer.from_pretrained(tiny.path())
    think.chat_template = THINK_TEMPLATE
    results, identical = [], True
    for template, tok, processes in (
        ("tiny", tokenizer, (1, 2)),
        ("think, 2 in 3 rows unstable", think, (2,)),
    ):
        for procs in processes:
            outputs = {}
            for name, path in (("TRL _prepare_dataset", trl), ("dpo_recipes", ours)):
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    outputs[name] = path(dataset, tok, procs if procs > 1 else None)
                    times.append(time.perf_counter() - start)
                median = statistics.median(times)
                results.append(
                    {
                        "path": name,
                        "template": template,
                        "num_proc": procs,
                        "rows_per_s": round(n / median),
                        "seconds_median": round(median, 2),
                        "seconds_min_max": [round(min(times), 2), round(max(times), 2)],
                    }
                )
            results[-1]["speedup"] = round(results[-1]["rows_per_s"] / results[-2]["rows_per_s"], 2)
            identical &= all(outputs["dpo_recipes"][c] == outputs["TRL _prepare_dataset"][c] for c in COLUMNS)
    directory.cleanup()
    return {"rows": n, "tokens_per_pair": round(tokens), "identical_ids": identical, "results": results}


def table(result: dict) -> str:
    lines = [
        f"{result['rows']:,} rows read from an Arrow file, about {result['tokens_per_pair']} tokens per pair; token ids identical: "
        f"{result['identical_ids']}.",
        "",
        "| path | template | processes | rows/s | median s (min-max) | speedup |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["results"]:
        low, high = r["seconds_min_max"]
        speedup = f"{r['speedup']}x" if "speedup" in r else ""
        lines.append(
            f"| {r['path']} | {r.get('template', 'tiny')} | {r['num_proc']} | {r['rows_per_s']:,} | {r['seconds_median']} ({low}-{high}) | {speedup} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run()))
