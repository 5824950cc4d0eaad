"""On-policy rounds: each round samples `rounds.samples` answers to each of `rounds.prompts` training
prompts from the current policy, scores them with the recipe's judge (a reward model's score, or a
pairwise judge's mean preference for the answer over the prompt's others), pairs the best answer against the
worst, and trains DPO on those pairs (and `rounds.offline` of the dataset's own) from the current
policy, which is also the round's reference (a LoRA round is merged into its base before the next, so
the adapter-off reference is the round before).
Each round is a run of its own in <dir>/round-<r>; a finished round is skipped and a crash resumes the
round it was in. Every round's greedy answers to held-out prompts are judged against the start's and
the round before's: <dir>/rounds.json, rounds.md and rounds.png.

python -m dpo_recipes.after.rounds [--name NAME] [--nproc N [--main-port P]] recipes=<recipe> [key=value ...]

--nproc N trains each round on N processes through `python -m dpo_recipes.launch` (as make train NPROC=N);
sampling and judging run in this process.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from hydra.core.hydra_config import HydraConfig

from data_prep import io
from data_prep.io import write_text
from dpo_recipes import config, errors
from dpo_recipes.after import evaluate, export, samples, trained
from dpo_recipes.after import judge as judges
from dpo_recipes.config import schema
from dpo_recipes.config.schema import RoundsSchema
from dpo_recipes.rundir import paths
from dpo_recipes.training import chat, data

REPORT = paths.ROUNDS
TIMES = "round.json"  # in each round's run dir: the seconds its training took
# Each round trains on its own pairs and is evaluated on the held-out rows the driver wrote once.
DATASET = ["dataset.format=trl", "dataset.sources=[]", "dataset.columns={}", "dataset.messages={}",
           "dataset.subset=null", "dataset.train_split=train", "dataset.eval_split=null",
           "dataset.eval_size=0", "dataset.max_samples=null", "dataset.max_eval_samples=null"]  # fmt: skip


@dataclass(frozen=True)
class Setup:
    dir: Path
    overrides: list[str]  # the recipe and the user's keys, for each round's training run
    built: config.Built
    rounds: RoundsSchema
    prompts: list  # distinct training prompts, none of them an eval prompt
    eval_prompts: list
    start: str  # the model the first round starts from
    offline: list  # the dataset's pairs on training prompts, when rounds.offline mixes them in
    nproc: int = 1  # processes that train each round
    port: int = 29500  # their rendezvous port (make MAIN_PORT=)


def distinct(rows) -> list:
    return list({judges.unit(row["prompt"]): row["prompt"] for row in rows}.values())


def prepare(name: str | None, overrides: list[str], nproc: int = 1, port: int = 29500) -> Setup:
    """Compose the recipe, refuse what rounds cannot run, and write the held-out rows once."""
    cfg, recipe = config.compose(overrides)
    if nproc > 1 and not cfg.hardware.accelerate_config:  # before the checks of this machine
        raise errors.ConfigError([
            f"--nproc {nproc}: hardware={HydraConfig.get().runtime.choices.get('hardware')} runs in one "
            f"process; train the rounds with one of {', '.join(schema.scalable())} (HARDWARE=...)"
        ])  # fmt: skip
    view = config.check(cfg)
    built = config.build(cfg, Path("outputs") / recipe, recipe)
    problems = []
    if built.task != "dpo":
        problems.append(f"task={built.task}: rounds train DPO (task=dpo)")
    if built.judge.kind not in judges.KINDS:
        problems.append(
            f"judge.kind={built.judge.kind}: rounds rank each prompt's sampled answers by a judge: a reward "
            "model (judge=tiny on the tiny recipes, judge=skywork_v2_qwen3_8b on the 7B ones) or "
            "judge.kind=pairwise with a causal LM as judge.path"
        )
    if view.rounds.samples < 2 or view.rounds.count < 1 or view.rounds.offline < 0:
        problems.append(
            "rounds.samples must be at least 2 (a best and a worst), rounds.count at least 1 and "
            "rounds.offline 0 or more"
        )
    if view.rounds.engine not in samples.ENGINES:
        problems.append(f"rounds.engine={view.rounds.engine}: one of {', '.join(samples.ENGINES)}")
    if problems:
        raise errors.ConfigError(problems)
    samples.engine(view.rounds.engine)  # vllm asked where it is not installed: refused before anything runs
    train, held, _ = data.load(built.dataset, built.args.seed)
    if held is None:
        raise errors.ConfigError(
            ["rounds are judged on held-out prompts: give the dataset eval_path, eval_split or eval_size"]
        )
    stamp = os.environ.get("DPO_RUN_STAMP") or time.strftime("%Y-%m-%d_%H-%M-%S")  # as make names runs
    run_dir = Path("outputs") / recipe / (name or stamp)
    eval_prompts = distinct(held)
    unseen = {judges.unit(p) for p in eval_prompts}
    prompts = [p for p in distinct(train) if judges.unit(p) not in unseen]
    recorded = run_dir / REPORT[0]
    ours = {"overrides": [o for o in overrides if not o.startswith("rounds.count=")], "nproc": nproc}
    if recorded.exists() and (before := settings(json.loads(recorded.read_text()))) != ours:
        raise errors.RunError(
            f"{run_dir} holds rounds run with {before}, not {ours}: one report would mix two experiments; "
            "pick another name (RUN=...)"
        )
    if not prompts:
        raise errors.ConfigError(
            ["rounds need training prompts: every one of the dataset's is an eval prompt"]
        )
    if not recorded.exists():  # the settings, before anything else: a rerun is checked against them
        write_text(recorded, json.dumps({**ours, "rounds": []}))
        io.write(held, run_dir / "data" / "eval.jsonl")
    start = built.model.model_name_or_path
    offline = []
    if view.rounds.offline:  # the dataset's own pairs, on training prompts only
        keep = ("prompt", "chosen", "rejected")
        offline = [{k: row[k] for k in keep} for row in train if judges.unit(row["prompt"]) not in unseen]
    return Setup(run_dir, ours["overrides"], built, view.rounds, prompts,
                 eval_prompts[: view.rounds.eval_prompts], start, offline, nproc, port)  # fmt: skip


def settings(report: dict) -> dict:
    """What one rounds dir keeps fixed: the overrides and the processes that train a round."""
    return {"overrides": report["overrides"], "nproc": report.get("nproc", 1)}


def fresh(items: list, r: int, n: int) -> list:
    """Round r's `n` items: the ones after the rounds before's, from the start again once all were used."""
    first = ((r - 1) * n) % len(items) if items else 0
    return (items[first:] + items[:first])[:n]


def tokenizer_of(s: Setup, model: str):
    """The start's tokenizer as training sets it up (template, EOS); a round's as its export saved it."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    if model != s.start:
        return AutoTokenizer.from_pretrained(model)
    tokenizer = chat.tokenizer(s.built)
    chat.check_template(tokenizer, Dataset.from_list([{"prompt": s.prompts[0]}]), s.built)
    return tokenizer


def freed() -> None:
    """Give the GPU back between models: a policy, the judge and a training run take turns on it."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def answers(s: Setup, model: str, prompts: list, temperature: float, seed: int, desc: str) -> list[str]:
    """Each prompt's answer from `model`, in batches (vLLM's, where rounds.engine picks it): sampled at
    `temperature`, or greedy at 0."""
    tokenizer, dtype = tokenizer_of(s, model), s.built.model.dtype or "auto"
    revision = s.built.model.model_revision if model == s.start else None
    flags = dict(revision=revision, trust_remote_code=s.built.args.trust_remote_code, use_safetensors=True)
    rounds = s.rounds
    options = SimpleNamespace(
        temperature=temperature, max_new_tokens=rounds.max_new_tokens, seed=seed, batch_size=rounds.batch_size
    )
    if samples.engine(rounds.engine) == "vllm":
        made = samples.vllm_answers(model, tokenizer, prompts, options, flags, dtype)
    else:
        policy = trained.load(model, dtype, "model.model_name_or_path", flags)
        decoding = samples.decoding_of(tokenizer, policy, options)
        made = evaluate.answers(policy, tokenizer, prompts, options, decoding, policy.device, desc)
        del policy
    freed()
    return made


def judge_of(s: Setup):
    evaluate.ready(s.built.judge.path, s.built.judge.revision)
    return judges.load(s.built.judge.kind, s.built.judge.path, s.built.judge.revision, s.rounds.batch_size)


def judged(s: Setup, prompts: list, texts: list[list[str]]) -> list[list[float]]:
    """`ranked`, with the judge loaded for it and let go after."""
    judge = judge_of(s)
    found = judges.ranked(judge, prompts, texts)
    del judge
    freed()
    return found


def sampled(s: Setup, r: int, model: str) -> dict:
    """Round r's pairs from `model`'s sampled answers, written once to <dir>/data/round-<r>.jsonl."""
    from datasets import Dataset

    out = s.dir / "data" / f"round-{r}.jsonl"
    stats = out.with_suffix(".report.json")
    if out.exists() and stats.exists():
        return json.loads(stats.read_text())
    rounds, k = s.rounds, s.rounds.samples
    prompts = fresh(s.prompts, r, rounds.prompts)
    clock = time.perf_counter()
    flat = answers(s, model, [p for p in prompts for _ in range(k)], rounds.temperature,
                   s.built.args.seed + r, f"round {r}: sampling {k} answers a prompt")  # fmt: skip
    generation = time.perf_counter() - clock
    grouped = [flat[i * k : (i + 1) * k] for i in range(len(prompts))]
    found = judged(s, prompts, grouped)
    judging = time.perf_counter() - clock - generation
    rows, dropped = judges.pairs(prompts, grouped, found, rounds.min_margin)
    scores = [x for row in found for x in row]
    if not rows:
        raise errors.RunError(
            f"round {r}: no pair kept of {len(prompts)} prompts ({dropped}): sample more answers a prompt "
            "(rounds.samples), at a higher rounds.temperature, or lower rounds.min_margin"
        )
    offline = fresh(s.offline, r, rounds.offline)
    report = {
        "prompts": len(prompts),
        "pairs": len(rows),
        "offline": len(offline),
        "dropped": dropped,
        "judge_scores": {
            "mean": round(float(np.mean(scores)), 4),
            "quartiles": [round(float(q), 4) for q in np.quantile(scores, [0.25, 0.5, 0.75])],
        },
        "mean_chars": round(float(np.mean([len(t) for t in flat])), 1),
        "seconds": {"sampling": round(generation, 1), "judging": round(judging, 1)},
    }
    io.write(Dataset.from_list(rows + offline), out)
    write_text(stats, json.dumps(report, indent=2))
    return report


def trained_round(s: Setup, r: int, model: str) -> None:
    """Train round r (or resume it) from `model` on its pairs; its seconds in <dir>/round-<r>/round.json."""
    run_dir = s.dir / f"round-{r}"
    if paths.summary(run_dir).get("status") == "finished":
        return
    keys = [f"hydra.run.dir={run_dir.absolute()}", f"dataset.path={(s.dir / 'data' / f'round-{r}.jsonl').absolute()}",
            f"dataset.eval_path={(s.dir / 'data' / 'eval.jsonl').absolute()}", *DATASET,
            f"model.model_name_or_path={model}", "run.resume=auto"]  # fmt: skip
    clock = time.perf_counter()
    launched = ["dpo_recipes.launch", "--nproc", str(s.nproc), "--main-port", str(s.port)]
    entry = launched if s.nproc > 1 else ["dpo_recipes.train"]
    done = subprocess.run([sys.executable, "-m", *entry, *s.overrides, *keys])
    if done.returncode != 0:
        raise errors.RunError(
            f"round {r}'s training failed (exit {done.returncode}); run the same command again to resume it"
        )
    write_text(run_dir / TIMES, json.dumps({"training": round(time.perf_counter() - clock, 1)}))


def merged(s: Setup, r: int) -> str:
    """Round r's policy as a standalone model: the next round's start and reference."""
    out = s.dir / f"round-{r}" / paths.EXPORT
    if not out.exists():
        export.export(trained.open_run(s.dir / f"round-{r}"), out, "5GB")
    return str(out.absolute())


def greedy(s: Setup, model: str, name: str) -> dict:
    """`model`'s greedy answers to the eval prompts, with a reward model's scores of them, kept in
    <dir>/data/answers-<name>.json."""
    cached = s.dir / "data" / f"answers-{name}.json"
    if not cached.exists():
        made = answers(s, model, s.eval_prompts, 0.0, 0, f"{name}: answering the eval prompts")
        found = {"answers": made, "scores": None}
        if s.built.judge.kind == "reward":
            found["scores"] = [x for [x] in judged(s, s.eval_prompts, [[a] for a in made])]
        write_text(cached, json.dumps(found, ensure_ascii=False))
    return json.loads(cached.read_text())


def compared(s: Setup, now: dict, others: dict[str, dict]) -> dict:
    """`now`'s answers against each of `others` by the judge: a reward model's scores, or the pairwise
    judge's verdicts (loaded once for all of them)."""
    judge = judge_of(s) if now["scores"] is None else None
    found = {}  # by answer set: round 1's round before is the start, judged once
    for other in others.values():
        if id(other) in found:
            continue
        if judge is None:
            prefs = judges.preferences(now["answers"], other["answers"], now["scores"], other["scores"])
        else:
            prefs, _ = judge.prefer(s.eval_prompts, now["answers"], other["answers"])
        found[id(other)] = judges.compare(
            prefs, [len(x) for x in now["answers"]], [len(x) for x in other["answers"]]
        )
    del judge
    freed()
    return {name: found[id(other)] for name, other in others.items()}


def iterate(s: Setup) -> dict:
    """Every round not yet finished, then the report across them."""
    report = {"overrides": s.overrides, "nproc": s.nproc, "start": s.start, "rounds": []}
    model, start = s.start, greedy(s, s.start, "start")
    previous = start
    for r in range(1, s.rounds.count + 1):
        sampled_report = sampled(s, r, model)
        trained_round(s, r, model)
        model = merged(s, r)
        clock = time.perf_counter()
        now = greedy(s, model, f"round-{r}")
        times = s.dir / f"round-{r}" / TIMES  # absent where a crash came between training and its record
        timed = json.loads(times.read_text()) if times.exists() else {}
        row = {
            "round": r,
            "run": str(s.dir / f"round-{r}"),
            "sampled": sampled_report,
            **compared(s, now, {"vs_start": start, "vs_previous": previous}),
            "seconds": {**sampled_report["seconds"], **timed, "eval": round(time.perf_counter() - clock, 1)},
        }
        report["rounds"].append(row)
        print(line(row))
        previous = now
        write(s, report)
    return report


def line(row: dict) -> str:
    def rate(c: dict) -> str:
        return f"{c['win_rate']:.2f} (95% CI {c['interval'][0]:.2f}-{c['interval'][1]:.2f})"

    p = row["sampled"]
    mixed = f" and {p['offline']} of the dataset's" if p.get("offline") else ""
    return (
        f"round {row['round']}: win rate vs start {rate(row['vs_start'])}, vs the round before "
        f"{rate(row['vs_previous'])}; length ratio vs start {row['vs_start']['length_ratio']:.2f}; "
        f"{p['pairs']} pairs of {p['prompts']} prompts{mixed}, sampled answers' judge score {p['judge_scores']['mean']:.2f}"
    )


def write(s: Setup, report: dict) -> None:
    """rounds.json, rounds.md (a line a round) and rounds.png (win rates and the sampled scores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_text(s.dir / REPORT[0], json.dumps(report, indent=2, ensure_ascii=False))
    lines = [
        f"# Rounds from {export.portable(report['start'])}",
        "",
        *(f"- {line(r)}" for r in report["rounds"]),
    ]
    write_text(s.dir / REPORT[1], "\n".join(lines) + "\n")
    figure, (rates, scores) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["round"] for r in report["rounds"]]
    for name in ("vs_start", "vs_previous"):
        mid = np.array([r[name]["win_rate"] for r in report["rounds"]])
        bounds = np.array([r[name]["interval"] for r in report["rounds"]]).T
        rates.errorbar(x, mid, yerr=[mid - bounds[0], bounds[1] - mid], marker="o", capsize=3, label=name)
    rates.axhline(0.5, color="grey", lw=0.8)
    rates.set(xlabel="round", ylabel="judged win rate (95% CI)", ylim=(0, 1), xticks=x)
    rates.legend()
    quartiles = np.array([r["sampled"]["judge_scores"]["quartiles"] for r in report["rounds"]]).T
    scores.plot(x, quartiles[1], marker="o")
    scores.fill_between(x, quartiles[0], quartiles[2], alpha=0.3)
    scores.set(xlabel="round", ylabel="judge score of the sampled answers (quartiles)", xticks=x)
    figure.tight_layout()
    with io.atomic_path(s.dir / REPORT[2]) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dpo_recipes.after.rounds", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--name", help="the rounds' dir, outputs/<recipe>/<name>; the same name resumes them")
    parser.add_argument("--nproc", type=int, default=1, help="processes that train each round (make NPROC=N)")
    parser.add_argument("--main-port", type=int, default=29500, help="their rendezvous port (MAIN_PORT)")
    options, overrides = parser.parse_known_args(argv)
    try:
        s = prepare(options.name, config.plain_keys(overrides), options.nproc, options.main_port)
        print(
            f"{s.rounds.count} round(s) in {s.dir}: {len(s.prompts)} training prompts, {len(s.eval_prompts)} eval prompts"
        )
        iterate(s)
    except (errors.UserError, OSError) as err:
        problems = getattr(err, "problems", None)
        print(
            "error: " + ("\n  - ".join(["invalid config:", *problems]) if problems else str(err)),
            file=sys.stderr,
        )
        return 2
    print(
        f"wrote {s.dir / REPORT[1]} and {REPORT[0]}, {REPORT[2]}; make eval RUN={s.dir}/round-<r> judges any round"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
