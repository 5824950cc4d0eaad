"""`python -m benchmarks gpu_rounds`, on a CUDA GPU with vLLM installed (`pip install vllm`): the rounds'
sampling (dpo_recipes/after/rounds.py `answers`) through vLLM beside transformers' generate, on the
tiny_rounds recipe's model: the greedy answers to the held-out prompts (how many of them the two
engines agree on), `rounds.samples` sampled answers to `PROMPTS` training prompts (how many distinct
answers a prompt gets: vLLM's engine is seeded once, so a prompt's copies differ), and the seconds each
took, model load included. Where vLLM is missing, the transformers rows alone.
"""

import importlib.util
import os
import tempfile
import time

import torch

from dpo_recipes.after import rounds

PROMPTS = 128


def run(prompts: int = PROMPTS) -> dict:
    here = os.getcwd()
    engines = ["transformers"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    found = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-rounds-") as scratch:
        os.chdir(scratch)
        try:
            for engine in engines:
                found[engine] = measure(
                    rounds.prepare(engine, ["recipes=tiny_rounds", f"rounds.engine={engine}"]), prompts
                )
        finally:
            os.chdir(here)
    greedy = {engine: found[engine].pop("answers") for engine in engines}
    same = [a == b for a, b in zip(*greedy.values(), strict=True)] if len(greedy) == 2 else []
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "engines": found,
        "greedy_agreement": round(sum(same) / len(same), 3) if same else None,
    }


def measure(s: rounds.Setup, prompts: int) -> dict:
    k, seed = s.rounds.samples, s.built.args.seed
    clock = time.perf_counter()
    greedy = rounds.answers(s, s.start, s.eval_prompts, 0.0, seed, "greedy answers")
    greedy_s = time.perf_counter() - clock
    asked = s.prompts[:prompts]
    clock = time.perf_counter()
    flat = rounds.answers(
        s, s.start, [p for p in asked for _ in range(k)], s.rounds.temperature, seed, "sampling"
    )
    sampled_s = time.perf_counter() - clock
    distinct = [len(set(flat[i * k : (i + 1) * k])) for i in range(len(asked))]
    return {
        "answers": greedy,
        "greedy": {"answers": len(greedy), "seconds": round(greedy_s, 1)},
        "sampled": {
            "answers": len(flat),
            "seconds": round(sampled_s, 1),
            "k": k,
            "distinct_per_prompt": round(sum(distinct) / len(distinct), 2),
        },
    }


def table(result: dict) -> str:
    agreement = result["greedy_agreement"]
    lines = [
        f"tiny_rounds' model on {result['device']}; the same prompts, stops, temperature and seed each way. "
        + (
            f"Greedy answers the engines agree on: {agreement:.0%}."
            if agreement is not None
            else "vLLM is not installed here: transformers alone."
        ),
        "",
        "| engine | greedy answers | s | sampled answers (k a prompt) | s | distinct answers a prompt |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for engine, r in result["engines"].items():
        g, s = r["greedy"], r["sampled"]
        lines.append(
            f"| {engine} | {g['answers']} | {g['seconds']} | {s['answers']} ({s['k']}) | {s['seconds']} | "
            f"{s['distinct_per_prompt']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run()))
