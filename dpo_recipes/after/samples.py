"""What DPO changed in the answers: for held-out prompts, generate from the reference and from the
trained policy with the same seed and decoding (in batches, padded on the left), and score each answer's implicit reward
beta * (log pi(y|x) - log pi_ref(y|x)). Writes <run>/dpo_metrics/samples.jsonl and samples.md.

python -m dpo_recipes.after.samples <run dir> [--n 16] [--prompts FILE] [--temperature 0.7] [--batch-size 16]

Where every prompt asks for a cheerful or a gloomy remark (the bundled toy data), samples.md also gives
how often each model answers in the asked-for mood, judged by the data's own mood words.
"""

import argparse
import json
import re
import sys
from pathlib import Path

from data_prep import io
from data_prep.io import write_text
from data_prep.tokens import token_ids
from dpo_recipes import errors
from dpo_recipes.after import trained
from dpo_recipes.after.judge import lines as judged
from dpo_recipes.after.judge import text
from dpo_recipes.config.schema import DatasetSchema
from dpo_recipes.rundir import paths
from dpo_recipes.training import data
from dpo_recipes.training.chat import stops

MOODS = ("cheerful", "gloomy")


def prompts(run: trained.Run, path: str | None) -> list[dict]:
    """Rows with a `prompt` (and `chosen` where known): the run's eval set, or a file of TRL-format rows
    (.json, .jsonl, .parquet, a saved dataset) or of one user message a line (.txt)."""
    if path and Path(path).suffix == ".txt":
        lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        return [{"prompt": [{"role": "user", "content": line}]} for line in lines]
    if path:
        rows = io.read(path)
    else:
        # as pairs where the run unpaired them (dataset.unpair, for KTO): each prompt once, with its chosen answer
        _, rows, _ = data.load(DatasetSchema(**{**run.config["dataset"], "unpair": False}), run.seed)
        if rows is None:
            raise errors.RunError("the run has no eval data: name prompts with --prompts FILE")
    if "prompt" not in rows.column_names:
        raise errors.RunError(f"{path or 'the eval data'}: no 'prompt' column (has {rows.column_names})")
    if "label" in rows.column_names:  # thumbs rows: each prompt once, with no chosen answer
        return list({json.dumps(row["prompt"]): {"prompt": row["prompt"]} for row in rows}.values())
    return list(rows)


def completion_logp(model, prompt: list[int], completion: list[int], device) -> float:
    """log p(completion | prompt), summed over the completion's tokens."""
    import torch

    ids = torch.tensor([prompt + completion], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(-1).gather(-1, ids[0, len(prompt) :, None]).sum().item()


def decoding_of(tokenizer, policy, options) -> dict:
    """`generate`'s arguments: greedy, or sampling at `options.temperature`; stopping where the model
    learned to (its EOS and the template's end of turn)."""
    return dict(
        max_new_tokens=options.max_new_tokens,
        do_sample=options.temperature > 0,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=stops(tokenizer, policy.generation_config),
        **({"temperature": options.temperature} if options.temperature > 0 else {}),
    )


def batched(model, tokenizer, prompts: list, options, decoding: dict, device, desc: str) -> list[list[int]]:
    """Each prompt's answer as token ids, up to and with its first stop token: `options.batch_size`
    prompts at a time, padded on the left, from `options.seed`."""
    import torch
    from tqdm import tqdm

    pad, out, stop = decoding["pad_token_id"], [], decoding["eos_token_id"]
    stop = set(stop) if isinstance(stop, list | tuple) else {stop}
    ids = [token_ids(tokenizer, p) for p in prompts]
    torch.manual_seed(options.seed)
    for start in tqdm(range(0, len(ids), options.batch_size), desc=desc, unit="batch"):
        batch = ids[start : start + options.batch_size]
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=device)
        with torch.no_grad():
            generated = model.generate(input_ids=input_ids, attention_mask=mask, **decoding)[:, width:]
        for row in generated.tolist():  # a row that stopped early is padded after its stop token
            out.append(row[: next((i + 1 for i, t in enumerate(row) if t in stop), len(row))])
    return out


ENGINES = ("auto", "vllm", "transformers")


def engine(asked: str) -> str:
    """The engine that generates: vLLM where asked, or at auto where it is installed and a GPU is there;
    transformers' generate otherwise."""
    import importlib.util

    import torch

    found = importlib.util.find_spec("vllm") is not None
    if asked == "vllm" and not found:
        why = "rounds.engine=vllm: vLLM is not installed here: pip install vllm or rounds.engine=transformers"
        raise errors.ConfigError([why])
    return ("vllm" if found and torch.cuda.is_available() else "transformers") if asked == "auto" else asked


def vllm_answers(model: str, tokenizer, prompts: list, options, flags: dict, dtype: str) -> list[str]:
    """Each prompt's answer from vLLM, in words: the token ids `batched` gives generate, its stops, its
    temperature (0: greedy). The engine is seeded once: a seed per request would give a prompt asked k
    times one answer k times."""
    from transformers import GenerationConfig
    from vllm import LLM, SamplingParams

    try:
        own = GenerationConfig.from_pretrained(model, revision=flags["revision"])
    except OSError:  # a model without a generation_config.json
        own = None
    llm = LLM(model=model, revision=flags["revision"], dtype=dtype, seed=options.seed,
              trust_remote_code=flags["trust_remote_code"])  # fmt: skip
    decoding = SamplingParams(temperature=options.temperature, max_tokens=options.max_new_tokens,
                              stop_token_ids=stops(tokenizer, own))  # fmt: skip
    made = llm.generate([{"prompt_token_ids": token_ids(tokenizer, p)} for p in prompts], decoding)
    del llm
    return [tokenizer.decode(x.outputs[0].token_ids, skip_special_tokens=True).strip() for x in made]


def generate(models: dict, tokenizer, rows: list[dict], beta: float, options) -> list[dict]:
    """Each model's answers to the prompts, generated in batches from the same seed, and the implicit
    reward of each answer."""
    from tqdm import tqdm

    policy, reference = models["policy"], models["reference"]
    decoding, device = decoding_of(tokenizer, policy, options), policy.device
    prompts = [row["prompt"] for row in rows]
    made = {
        name: batched(model, tokenizer, prompts, options, decoding, device, f"generating ({name})")
        for name, model in models.items()
    }
    out = []
    for i, row in enumerate(tqdm(rows, desc="scoring the answers", unit="prompt")):
        ids, sample = (
            token_ids(tokenizer, row["prompt"]),
            {"prompt": row["prompt"], "chosen": row.get("chosen")},
        )
        for name, answers in made.items():
            logps = [completion_logp(m, ids, answers[i], device) for m in (policy, reference)]
            text = tokenizer.decode(answers[i], skip_special_tokens=True).strip()
            sample[name] = {"text": text, "implicit_reward": round(beta * (logps[0] - logps[1]), 4)}
        out.append(sample)
    return out


def mood_words(rows: list[dict]) -> dict | None:
    """The words only the chosen answers to one mood's prompts use, per mood; None unless every prompt
    asks for exactly one of MOODS."""
    asked = [asked_mood(row["prompt"]) for row in rows]
    if None in asked or any(row.get("chosen") is None for row in rows):
        return None
    words = {mood: set() for mood in MOODS}
    for mood, row in zip(asked, rows, strict=True):
        words[mood] |= set(re.findall(r"[a-z]+", text(row["chosen"]).lower()))
    return {mood: words[mood] - set().union(*(w for m, w in words.items() if m != mood)) for mood in MOODS}


def asked_mood(prompt) -> str | None:
    found = [m for m in MOODS if m in re.findall(r"[a-z]+", text(prompt).lower())]
    return found[0] if len(found) == 1 else None


def mood_of(answer: str, words: dict) -> str | None:
    said = set(re.findall(r"[a-z]+", answer.lower()))
    counts = {mood: len(said & w) for mood, w in words.items()}
    best = max(counts.values())
    top = [m for m, n in counts.items() if n == best]
    return top[0] if best and len(top) == 1 else None


def mood_rates(samples: list[dict], words: dict) -> dict:
    """The share of answers in the asked-for mood, per model."""
    return {
        name: sum(mood_of(s[name]["text"], words) == asked_mood(s["prompt"]) for s in samples) / len(samples)
        for name in ("reference", "policy")
    }


def cell(value) -> str:
    return text(value or "").replace("|", "\\|").replace("\n", "<br>") if value else ""


def markdown(run: trained.Run, samples: list[dict], rates: dict | None, options) -> str:
    decoding = (
        "greedy" if options.temperature <= 0 else f"temperature {options.temperature}, seed {options.seed}"
    )
    lines = [
        f"# Samples of {run.summary.get('recipe')} ({run.dir})",
        "",
        f"{len(samples)} prompts, {decoding}, at most {options.max_new_tokens} new tokens. The reference is "
        f"what the run trained against ({run.summary['reference']['strategy']}); the reward of an answer is "
        f"beta * (log pi(y|x) - log pi_ref(y|x)) with beta = {run.beta}.",
        "",
    ]
    if "eval" in run.summary:  # make eval: the answers judged
        lines += [*(f"- {line}" for line in judged(run.summary["eval"])), ""]
    if rates:
        lines += [
            f"Answers in the asked-for mood: reference {rates['reference']:.0%}, policy {rates['policy']:.0%}.",
            "",
        ]
    lines += [
        "| # | prompt | chosen (data) | reference | reward | policy | reward |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, s in enumerate(samples):
        ref, pol = s["reference"], s["policy"]
        lines.append(
            f"| {i} | {cell(s['prompt'])} | {cell(s['chosen'])} | {cell(ref['text'])} | "
            f"{ref['implicit_reward']:.3f} | {cell(pol['text'])} | {pol['implicit_reward']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def parser(module: str, doc: str, n: int) -> argparse.ArgumentParser:
    """The options `make samples` and `make eval` share: the run, its prompts and the decoding."""
    found = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    found.add_argument("run", help="the run dir (outputs/<recipe>/<time> or the RUN name's dir)")
    found.add_argument("--n", type=int, default=n, help=f"how many held-out prompts (default {n})")
    found.add_argument("--prompts", help="prompts from this file instead of the run's eval set")
    found.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    found.add_argument("--max-new-tokens", type=int, default=128)
    found.add_argument("--seed", type=int, default=0)
    found.add_argument("--batch-size", type=int, default=16, help="prompts generated at once")
    found.add_argument("--force", action="store_true", help="use a stopped run's newest checkpoint")
    return found


def main(argv: list[str]) -> int:
    options = parser("dpo_recipes.after.samples", __doc__, 16).parse_args(argv)
    try:
        run = trained.open_run(options.run, options.force).generates
        rows = prompts(run, options.prompts)
        words = mood_words(rows)  # from every row, not only the ones sampled
        rows = rows[: options.n]
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run.weights)
        policy = trained.policy(run)
        models = {"reference": trained.reference(run, policy), "policy": policy}
        samples = generate(models, tokenizer, rows, run.beta, options)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rates = mood_rates(samples, words) if words else None
    out = paths.metrics_dir(run.dir)
    write_text(out / paths.SAMPLES[0], "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    write_text(out / paths.SAMPLES[1], markdown(run, samples, rates, options))
    if rates:
        print(
            f"answers in the asked-for mood: reference {rates['reference']:.0%}, policy {rates['policy']:.0%}"
        )
    print(f"wrote {out / paths.SAMPLES[1]} and {paths.SAMPLES[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
