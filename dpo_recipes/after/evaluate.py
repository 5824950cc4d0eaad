"""Did DPO make the answers better? For N distinct held-out prompts of a run's eval set (for a run
trained with judge.every, not the ones its best checkpoint was picked on), generate from the
reference and the trained policy (in batches, padded on the left), judge policy vs reference and policy
vs the data's chosen answer, and report each comparison's win rate with a 95% Wilson interval over
prompts, the length-controlled rate and the answer-length ratio, beside the judge's own agreement with
the data. Writes <run>/dpo_metrics/eval.json and eval.jsonl and adds the numbers to summary.json.

python -m dpo_recipes.after.evaluate <run dir> [--n 64] [--judge PATH --kind reward|pairwise]
    [--temperature 0.7 --samples 4] [--batch-size 16]

The judge is the run's `judge` option (judge=tiny on the tiny recipes) unless --judge names another.
"""

import json
import sys
from pathlib import Path

from data_prep.io import write_text
from dpo_recipes import errors
from dpo_recipes.after import judge as judges
from dpo_recipes.after import samples, trained
from dpo_recipes.rundir import paths
from dpo_recipes.sources import tiny

# A policy that wins by writing longer: flagged when its answers are this much longer than the other
# side's and the length-controlled rate is below the raw one.
LONG = 1.5


def answers(model, tokenizer, prompts: list, options, decoding: dict, device, desc: str) -> list[str]:
    """Each prompt's answer in words, generated in batches (samples.batched)."""
    made = samples.batched(model, tokenizer, prompts, options, decoding, device, desc)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in made]


def generated(run: trained.Run, prompts: list, options) -> dict:
    """The reference's and the policy's answers, from one loaded policy (for LoRA, the reference is the
    policy with its adapter disabled)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run.weights)
    policy = trained.policy(run)
    made, decoding = {}, samples.decoding_of(tokenizer, policy, options)
    for name, model in (("reference", trained.reference(run, policy)), ("policy", policy)):
        made[name] = answers(
            model, tokenizer, prompts, options, decoding, policy.device, f"generating ({name})"
        )
    return made


def ready(path: str, revision: str | None) -> None:
    """Fail fast on a judge that cannot be had; the tiny judge is built on first use."""
    if Path(path) == tiny.judge_path(build=False):
        tiny.judge_path()
    judges.reachable(path, revision)


def judged(judge, prompts: list, a: list[str], b: list[str], groups: list[int]) -> tuple[dict, list, dict]:
    prefs, scores = judge.prefer(prompts, a, b)
    numbers = judges.compare(prefs, [len(x) for x in a], [len(x) for x in b], groups)
    return numbers, prefs, scores


def notes(comparisons: dict) -> list[str]:
    out = []
    for name, c in comparisons.items():
        if c["length_ratio"] > LONG and c["lc_win_rate"] < c["win_rate"]:
            out.append(
                f"{name}: the policy's answers are {c['length_ratio']:.1f}x as long and its length-controlled "
                f"win rate ({c['lc_win_rate']:.2f}) is below the raw one ({c['win_rate']:.2f}): part of the win "
                "is length (DPO's known exploit); consider a length-normalized loss (loss=sigmoid_norm) or ld_dpo"
            )
    return out


def held_out(run: trained.Run, options) -> tuple[list[dict], list[str]]:
    """The first `options.n` distinct held-out prompts, a row each (a prompt is the unit the interval
    counts); for a run trained with judge.every, none of the prompts its best checkpoint was picked on."""
    first = {}
    for row in samples.prompts(run, options.prompts):
        first.setdefault(judges.unit(row["prompt"]), row)  # each prompt's first row, in the data's order
    rows = list(first.values())
    node, notes = run.config.get("judge") or {}, []
    if node.get("every") and not options.prompts:
        picked = {judges.unit(p) for p in judges.selection([row["prompt"] for row in rows], node["prompts"])}
        rows = [row for row in rows if judges.unit(row["prompt"]) not in picked]
        notes.append(
            f"{len(picked)} held-out prompts set aside: judge.every picked the best checkpoint on them"
        )
        if not rows:
            raise errors.RunError(
                f"{run.dir}: every held-out prompt was one judge.every picked checkpoints on: name other "
                "prompts with --prompts FILE"
            )
    return rows[: options.n], notes


def evaluate(run: trained.Run, options) -> dict:
    """Generate, judge and write; returns what eval.json holds."""
    node = run.config.get("judge") or {}
    kind, path = options.kind or node.get("kind", "none"), options.judge or node.get("path")
    if kind == "none" or not path:
        raise errors.RunError(
            "no judge: name one with --judge PATH (a reward model folder or hub id; --kind pairwise for a "
            "causal LM), or train with judge=<option> (conf/judge/)"
        )
    revision = options.judge_revision or node.get("revision")
    ready(path, revision)
    rows, aside = held_out(run, options)
    k = options.samples if options.temperature > 0 else 1
    prompts = [row["prompt"] for row in rows for _ in range(k)]
    groups = [i for i in range(len(rows)) for _ in range(k)]
    made = generated(run, prompts, options)  # the models freed before the judge loads
    judge = judges.load(kind, path, revision, options.batch_size)
    comparisons, per_answer = {}, {}
    comparisons["policy_vs_reference"], prefs, scores = judged(
        judge, prompts, made["policy"], made["reference"], groups
    )
    per_answer["policy_vs_reference"] = (made["reference"], prefs, scores)
    pairs = [row for row in rows if row.get("chosen") is not None and row.get("rejected") is not None]
    agreement = None
    if len(pairs) == len(rows):
        chosen = [judges.text(row["chosen"]) for row in rows for _ in range(k)]
        comparisons["policy_vs_chosen"], prefs, scores = judged(
            judge, prompts, made["policy"], chosen, groups
        )
        per_answer["policy_vs_chosen"] = (chosen, prefs, scores)
        agree, _ = judge.prefer(
            [row["prompt"] for row in rows],
            [judges.text(row["chosen"]) for row in rows],
            [judges.text(row["rejected"]) for row in rows],
        )
        agreement = round(float(judges.outcomes(agree).mean()), 4)
    report = {
        "judge": {"kind": kind, "path": str(path)},
        "prompts": len(rows),
        "samples_per_prompt": k,
        "decoding": "greedy" if options.temperature <= 0 else f"temperature {options.temperature}",
        "interval": "95%, Wilson's score over prompts at their effective count (judge.interval)",
        "judge_agrees_with_data": agreement,
        "comparisons": comparisons,
        "notes": aside + notes(comparisons),
    }
    write(run, report, prompts, made["policy"], per_answer)
    return report


def write(run: trained.Run, report: dict, prompts: list, policy: list[str], per_answer: dict) -> None:
    out = paths.metrics_dir(run.dir)
    lines = []
    for name, (other, prefs, scores) in per_answer.items():
        for i, prompt in enumerate(prompts):
            verdict = "win" if prefs[i] > 0.5 else "loss" if prefs[i] < 0.5 else "tie"
            lines.append(
                {
                    "comparison": name, "prompt": prompt, "policy": policy[i], "other": other[i],
                    "scores": {k: v[i] for k, v in scores.items()}, "preference": prefs[i], "verdict": verdict,
                }
            )  # fmt: skip
    write_text(out / paths.EVAL[0], "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    write_text(out / paths.EVAL[1], json.dumps(report, indent=2))
    summary = json.loads(paths.summary_file(run.dir).read_text())
    summary["eval"] = report
    write_text(paths.summary_file(run.dir), json.dumps(summary, indent=2, default=str))


def main(argv: list[str]) -> int:
    parser = samples.parser("dpo_recipes.after.evaluate", __doc__, 64)
    parser.add_argument(
        "--judge", help="a reward model (or, with --kind pairwise, a causal LM): folder or hub id"
    )
    parser.add_argument("--kind", choices=judges.KINDS, help="with --judge: reward (default) or pairwise")
    parser.add_argument("--judge-revision")
    parser.add_argument("--samples", type=int, default=1, help="answers a prompt when sampling")
    options = parser.parse_args(argv)
    if options.judge and not options.kind:
        options.kind = "reward"
    try:
        run = trained.open_run(options.run, options.force).generates
        report = evaluate(run, options)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(judges.lines(report)))
    print(f"wrote {paths.metrics_dir(run.dir) / paths.EVAL[1]} and {paths.EVAL[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
