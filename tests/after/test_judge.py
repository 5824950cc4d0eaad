"""The judge (dpo_recipes/after/judge.py) and `make eval` (dpo_recipes/after/evaluate.py): the statistics on
synthetic verdicts, the pairwise judge's symmetry on a causal LM made here, the tiny judge against the
toy data, and the default run judged against its reference."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from dpo_recipes import errors
from dpo_recipes.after import evaluate, samples
from dpo_recipes.after import judge as judges
from dpo_recipes.sources import tiny


def test_the_length_controlled_rate_discounts_a_win_that_length_alone_explains():
    rng = np.random.default_rng(0)
    longer = rng.random(200) < 0.8  # the first answer is longer on 80% of prompts, and wins exactly there
    len_b = rng.integers(20, 200, 200)
    len_a = np.where(longer, len_b + rng.integers(5, 100, 200), len_b - rng.integers(5, 19, 200))
    raw = judges.compare(longer.astype(float), len_a, len_b)
    assert raw["win_rate"] == pytest.approx(longer.mean()) and raw["length_ratio"] > 1
    assert abs(raw["lc_win_rate"] - 0.5) < abs(raw["win_rate"] - 0.5) / 2, raw
    # where length says nothing of who wins, the length-controlled rate stays with the raw one
    wins = (rng.random(200) < 0.8).astype(float)
    same = judges.compare(wins, rng.integers(20, 200, 200), rng.integers(20, 200, 200))
    assert same["lc_win_rate"] == pytest.approx(same["win_rate"], abs=0.03), same


@pytest.mark.slow
def test_a_reward_judge_without_a_tokenizer_pad_keeps_the_pad_token_it_was_trained_with(tmp_path):
    """A reward model whose config names its own pad token, with a tokenizer that has none: the judge pads
    with that token, so the score is read at the answer's last token (its end-of-turn), not one early as
    padding with the EOS would."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny.path())
    own = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.pad_token = None
    # turns that end at the EOS, as Llama 3's end at <|eot_id|>: the last token of every text is the EOS
    tokenizer.chat_template = tokenizer.chat_template.replace("'<|im_end|>' + '\n'", "'<|im_end|>'")
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = LlamaConfig(vocab_size=len(tokenizer), num_labels=1, pad_token_id=own, **shape)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    judge = judges.load("reward", str(tmp_path))
    assert judge.tokenizer.pad_token_id == own != judge.tokenizer.eos_token_id
    prompts, answers = (
        ["Say something cheerful."] * 2,
        ["A bright day.", "A bright day, with friends and cake."],
    )
    scores = judge.scores(prompts, answers)
    for prompt, answer, score in zip(prompts, answers, scores, strict=True):
        text = judge.chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
        ids = judge.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert ids[0, -1] == judge.tokenizer.eos_token_id  # the template ends the turn with the EOS
        with torch.no_grad():  # the model alone, unpadded: its score at the last token
            alone = judge.model(input_ids=ids).logits[0, 0].item()
        assert score == pytest.approx(alone, abs=1e-5)


def test_the_interval_at_all_wins_or_all_ties_is_wilsons_not_a_point():
    all_won = judges.compare([1.0] * 32, [1] * 32, [1] * 32)["interval"]
    assert all_won == pytest.approx([0.8928, 1.0], abs=1e-4)  # a percentile bootstrap gives [1.0, 1.0]
    assert judges.compare([1.0] * 31 + [0.0], [1] * 32, [1] * 32)["interval"] == pytest.approx(
        [0.8426, 0.9945], abs=1e-4
    )
    low, high = judges.compare([0.5] * 16, [1] * 16, [1] * 16)["interval"]
    assert low < 0.5 < high


@pytest.mark.parametrize("prompts", [16, 32, 64])
def test_the_interval_covers_the_true_rate_at_its_stated_rate(prompts):
    """1,000 simulated evals a cell: verdicts drawn at a known rate, one a prompt, or four a prompt from
    prompts that differ (each its own rate, drawn around the true one). The 95% interval covers the true
    rate at least 91% of the time in every cell and 93% on average (measured: 0.92-0.97, means
    0.93-0.95; the percentile bootstrap it replaced covered 38% at 16 prompts and rate 0.97)."""
    rng, covered = np.random.default_rng(prompts), []
    for rate in (0.5, 0.8, 0.9, 0.97):
        for answers in (1, 4):
            hits = 0
            for _ in range(1000):
                own = rng.beta(rate * 2, (1 - rate) * 2, prompts) if answers > 1 else np.full(prompts, rate)
                won = (rng.random((prompts, answers)) < own[:, None]).astype(float).ravel()
                low, high = judges.compare(
                    won, [1] * len(won), [1] * len(won), np.repeat(np.arange(prompts), answers)
                )["interval"]
                hits += low <= rate <= high
            covered.append(hits / 1000)
    assert min(covered) >= 0.91 and np.mean(covered) >= 0.93, covered


def test_the_interval_is_over_prompts_and_holds_the_rate():
    rng = np.random.default_rng(1)
    coin = judges.compare(rng.integers(0, 2, 64).astype(float), [1] * 64, [1] * 64)
    assert coin["interval"][0] < 0.5 < coin["interval"][1], coin
    clear = judges.compare([1.0] * 56 + [0.0] * 8, [1] * 64, [1] * 64)
    assert clear["win_rate"] == 0.875 and clear["interval"][0] > 0.5 and clear["wins"] == 56
    # ties count half; four answers a prompt: resampling prompts, not answers, widens the interval
    ties = judges.compare([0.5] * 10 + [1.0] * 10, [1] * 20, [1] * 20)
    assert (ties["win_rate"], ties["ties"]) == (0.75, 10)
    prefs = [float(x) for x in np.repeat(rng.integers(0, 2, 16), 4)]
    grouped = judges.compare(prefs, [1] * 64, [1] * 64, groups=np.repeat(np.arange(16), 4))
    flat = judges.compare(prefs, [1] * 64, [1] * 64)
    assert np.diff(grouped["interval"]) > np.diff(flat["interval"])


def test_a_policy_that_wins_by_length_gets_a_note():
    long = {"win_rate": 0.8, "lc_win_rate": 0.6, "length_ratio": 1.8}
    assert "DPO's known exploit" in evaluate.notes({"policy_vs_reference": long})[0]
    assert evaluate.notes({"a": {**long, "length_ratio": 1.2}, "b": {**long, "lc_win_rate": 0.85}}) == []


def test_a_hub_id_judge_offline_is_one_message_naming_it_and_the_fix(monkeypatch):
    import huggingface_hub

    # No network here either way; offline mode (HF_HUB_OFFLINE=1, read at import) answers at once.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(errors.Unreachable) as err:
        judges.reachable("nobody-here/no-such-judge-7f3a")
    assert "cannot fetch the judge 'nobody-here/no-such-judge-7f3a'" in str(err.value)
    assert "hf download nobody-here/no-such-judge-7f3a" in str(err.value) and "judge.path" in str(err.value)


PROMPTS = [[{"role": "user", "content": f"Tell me something {m} about a {t}."}]
           for m in samples.MOODS for t in ("cave", "lamp", "river", "garden")]  # fmt: skip


@pytest.mark.slow
def test_the_pairwise_judge_gives_the_mirrored_verdict_when_the_answers_swap(tmp_path):
    """On a random causal LM (made here, with the tiny Llama's tokenizer and chat template), whose
    position bias is whatever its weights give."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny.path())
    torch.manual_seed(3)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **shape)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    judge = judges.load("pairwise", str(tmp_path), batch_size=3)
    a = ["What a lovely day it is.", "Gloom.", "It is grey and sad.", "Sunny!"] * 2
    b = ["It is dull.", "A cave is a happy place to be.", "It is grey and sad.", "Rain again."] * 2
    ab, scores = judge.prefer(PROMPTS, a, b)
    ba, _ = judge.prefer(PROMPTS, b, a)
    assert np.allclose(np.add(ab, ba), 1.0, atol=1e-7)
    assert all(judges.outcomes(ab) + judges.outcomes(ba) == 1)  # win <-> loss, tie <-> tie
    assert ab[2] == 0.5 and len({round(p, 6) for p in ab}) > 2  # the same answer ties; the rest differ
    # the position bias it cancels is there: as A, an answer is not read as it is as B
    assert not np.allclose(scores["a_first"], 1 - np.asarray(scores["b_first"]), atol=1e-3)


def toy_eval_rows() -> list[dict]:
    return [json.loads(line) for line in (tiny.CORPUS / "eval.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_tiny_judge_prefers_the_datas_chosen_answer_on_the_toy_eval_pairs():
    """Built from the toy training pairs only; the eval prompts are new to it."""
    rows = toy_eval_rows()
    train_prompts = {json.dumps(json.loads(line)["prompt"]) for line in (tiny.CORPUS / "train.jsonl").open()}
    assert not train_prompts & {json.dumps(r["prompt"]) for r in rows}
    judge = judges.load("reward", str(tiny.judge_path()))
    prefs, _ = judge.prefer(
        [r["prompt"] for r in rows],
        [judges.text(r["chosen"]) for r in rows],
        [judges.text(r["rejected"]) for r in rows],
    )
    assert judges.outcomes(prefs).mean() >= 0.95 and len(rows) >= 64


def options(**kw) -> SimpleNamespace:
    base = dict(n=64, prompts=None, judge=None, kind=None, judge_revision=None, temperature=0.0, samples=1,
                max_new_tokens=48, batch_size=16, seed=0)  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.slow
def test_the_default_run_beats_its_reference_by_the_judge_and_by_the_mood_rule(default_run):
    """`make eval RUN=<the default run>`, as docs/judging.md shows it: the run's own judge (judge=tiny)."""
    from conftest import python_m

    from dpo_recipes.after import trained

    metrics = default_run[1]
    done = python_m("dpo_recipes.after.evaluate", str(metrics.parent), "--n", "64", "--max-new-tokens", "48")
    assert done.returncode == 0, done.stderr
    report = json.loads((metrics / "eval.json").read_text())
    assert done.stdout.splitlines()[:-1] == judges.lines(report)
    assert "this judge agrees with your data on" in done.stdout and "length-controlled" in done.stdout
    versus = report["comparisons"]["policy_vs_reference"]
    assert versus["n"] == report["prompts"] == 64 and set(report["comparisons"]) == {
        "policy_vs_reference", "policy_vs_chosen"
    }  # fmt: skip
    # the trained policy's answers depend on the CPU's kernels: 0.8 and more on Intel Xeons and an AVX2
    # AMD EPYC, 0.71 (40 wins, 11 ties, 13 losses) on an AMD EPYC with AVX-512; the interval clears 1/2
    assert versus["win_rate"] >= 0.65 and versus["interval"][0] > 0.5, versus
    assert report["judge_agrees_with_data"] >= 0.95
    lines = [json.loads(x) for x in (metrics / "eval.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 64 and json.loads((metrics / "summary.json").read_text())["eval"] == report
    # where the mood rule decides (one answer in the asked-for mood, the other not), the judge agrees
    run = trained.open_run(metrics.parent)
    words = samples.mood_words(samples.prompts(run, None))
    decided = agree = 0
    for line in lines[:64]:
        asked = samples.asked_mood(line["prompt"])
        ours, theirs = (samples.mood_of(line[k], words) == asked for k in ("policy", "other"))
        if ours != theirs:
            decided += 1
            agree += line["verdict"] == ("win" if ours else "loss")
    assert decided >= 16 and agree >= 0.9 * decided, (agree, decided)
    # the numbers reach the model card and samples.md
    from dpo_recipes.after import export

    assert all(f"- {export.portable(line)}" in export.card(run, "LoRA") for line in judges.lines(report))
    assert judges.lines(report)[1] in samples.markdown(run, [], None, options())


@pytest.mark.slow
def test_a_policy_that_did_not_train_gives_an_interval_holding_one_half(default_run):
    """The control: a LoRA policy that did not train is its reference (the adapter starts at zero), so
    every greedy answer ties. (Two sampling seeds of the reference against each other would put 0.5
    outside the 95% interval one time in twenty, as any calibrated interval does: not a test.)"""
    from transformers import AutoTokenizer

    from dpo_recipes.after import trained

    run = trained.open_run(default_run[1].parent)
    prompts = [r["prompt"] for r in samples.prompts(run, None)[:64]]
    tokenizer = AutoTokenizer.from_pretrained(run.weights)
    policy = trained.policy(run)
    untrained = trained.reference(run, policy)  # the policy with its adapter off: as at step 0
    decoding = samples.decoding_of(tokenizer, policy, options())
    made = [evaluate.answers(untrained, tokenizer, prompts, options(), decoding, policy.device, "c")] * 2
    judge = judges.load("reward", str(tiny.judge_path()))
    numbers, _, _ = evaluate.judged(judge, prompts, *made, list(range(len(prompts))))
    assert numbers["interval"][0] <= 0.5 <= numbers["interval"][1] and numbers["ties"] == 64, numbers


@pytest.mark.slow
def test_two_samplings_of_one_model_judged_against_each_other_hold_one_half_at_the_stated_rate():
    """The control that consults the judge: 100 pairs of independent samplings (temperature 1) of the
    tiny base's answers to the distinct toy eval prompts, each pair judged by the tiny judge. The two
    sides are one policy, so a 95% interval should hold 1/2 in about 95 of the 100: at least 88 (below
    that is under 1 in 1,000 for a calibrated interval) and not all 100 (too wide to say anything)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = list({judges.unit(r["prompt"]): r["prompt"] for r in toy_eval_rows()}.values())
    tokenizer = AutoTokenizer.from_pretrained(tiny.path())
    model = AutoModelForCausalLM.from_pretrained(tiny.path()).eval()
    sampling = options(temperature=1.0, batch_size=128)
    decoding = samples.decoding_of(tokenizer, model, sampling)
    repeats, n = 100, len(prompts)
    made = evaluate.answers(model, tokenizer, prompts * 2 * repeats, sampling, decoding, model.device, "s")
    scores = judges.load("reward", str(tiny.judge_path())).scores(prompts * 2 * repeats, made)
    held = []
    for i in range(repeats):
        a, b = slice(2 * i * n, (2 * i + 1) * n), slice((2 * i + 1) * n, (2 * i + 2) * n)
        prefs = judges.preferences(made[a], made[b], scores[a], scores[b])
        low, high = judges.compare(prefs, [len(x) for x in made[a]], [len(x) for x in made[b]])["interval"]
        held.append(low <= 0.5 <= high)
    assert 88 <= sum(held) < repeats, sum(held)


@pytest.mark.slow
def test_batched_generation_gives_the_one_prompt_at_a_time_answers(default_run):
    """Greedy: left padding changes no answer (the positions follow the mask)."""
    from transformers import AutoTokenizer

    from dpo_recipes.after import trained

    run = trained.open_run(default_run[1].parent)
    prompts = [r["prompt"] for r in samples.prompts(run, None)[:12]]
    tokenizer = AutoTokenizer.from_pretrained(run.weights)
    policy = trained.policy(run)
    decoding = samples.decoding_of(tokenizer, policy, options())
    batched = evaluate.answers(
        policy, tokenizer, prompts, options(batch_size=12), decoding, policy.device, "b"
    )
    alone = evaluate.answers(policy, tokenizer, prompts, options(batch_size=1), decoding, policy.device, "1")
    assert batched == alone


@pytest.mark.slow
def test_judging_while_training_logs_the_win_rate_and_export_takes_the_best_step(tmp_path, default_run):
    """judge.every=50 on the default recipe (150 steps): a win-rate column with its interval at steps
    50, 100, 150; the training itself the default run's, loss for loss; the best judged step's checkpoint
    kept through save_total_limit=1; `--checkpoint best` exports it, with that step's metrics on its card."""
    import csv

    from conftest import python_m, run

    trainer, metrics = run(tmp_path, ["judge.every=50", "judge.prompts=16", "train.save_total_limit=1"])
    rows = list(csv.DictReader((metrics / "training_metrics.csv").open()))
    judged = {int(r["step"]): float(r["eval_judge/win_rate"]) for r in rows if r.get("eval_judge/win_rate")}
    assert list(judged) == [50, 100, 150], judged
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    assert losses == [(e["step"], e["loss"]) for e in default_run[0].state.log_history if "loss" in e]
    for r in rows:
        if r.get("eval_judge/win_rate"):
            assert (
                float(r["eval_judge/win_rate_low"])
                <= float(r["eval_judge/win_rate"])
                <= float(r["eval_judge/win_rate_high"])
            )
    step = max(judged, key=lambda s: (judged[s], -s))  # the first best
    best = json.loads((metrics / "summary.json").read_text())["best"]["eval_judge/win_rate"]
    assert best == {"value": judged[step], "step": step}
    assert trainer.judging.reference is not None and len(trainer.judging.prompts) == 16
    kept = sorted(p.name for p in metrics.parent.glob("checkpoint-*"))
    assert f"checkpoint-{step}" in kept or step == 150, kept
    done = python_m(
        "dpo_recipes.after.export", str(metrics.parent), "--checkpoint", "best", "--out", str(tmp_path / "x")
    )
    assert done.returncode == 0, done.stderr
    card = (tmp_path / "x" / "README.md").read_text()
    assert (f"the weights of checkpoint-{step}" in card) == (step != 150), card
    assert f"| eval_judge/win_rate | {judged[step]:.4g} |" in card  # the numbers of the weights shipped
    # without judging, --checkpoint best says what to do
    (metrics / "summary.json").write_text(
        json.dumps({**json.loads((metrics / "summary.json").read_text()), "best": {}})
    )
    done = python_m(
        "dpo_recipes.after.export", str(metrics.parent), "--checkpoint", "best", "--out", str(tmp_path / "y")
    )
    assert (
        done.returncode == 2 and "trained with judge.every=N" in done.stderr and not (tmp_path / "y").exists()
    )


@pytest.mark.slow
def test_the_reward_model_recipe_trains_a_judge(tmp_path):
    """`make train RECIPE=tiny_reward_model`: RewardTrainer through the same groups, the same metrics
    files with eval accuracy; the run dir judges, preferring the data's chosen answer on the toy eval
    pairs; samples and eval refuse it with what to do instead."""
    from conftest import python_m, run

    trainer, metrics = run(tmp_path, ["recipes=tiny_reward_model"])
    assert type(trainer).__name__ == "RewardTrainer"
    for name in ("training_metrics.csv", "training_curves.png", "summary.json", "log_history.json"):
        assert (metrics / name).exists(), name
    summary = json.loads((metrics / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["task"] == "reward" and summary["reference"] is None
    assert summary["final"]["eval_accuracy"] >= 0.95 and summary["best"]["eval_accuracy"]["value"] >= 0.95
    assert "eval_accuracy" in (metrics / "training_metrics.csv").read_text().splitlines()[0]
    rows = toy_eval_rows()
    judge = judges.load("reward", str(metrics.parent))
    prefs, _ = judge.prefer(
        [r["prompt"] for r in rows],
        [judges.text(r["chosen"]) for r in rows],
        [judges.text(r["rejected"]) for r in rows],
    )
    assert judges.outcomes(prefs).mean() >= 0.95
    for module in ("dpo_recipes.after.samples", "dpo_recipes.after.evaluate"):
        done = python_m(module, str(metrics.parent))
        assert done.returncode == 2 and "holds a reward model, which scores answers" in done.stderr
