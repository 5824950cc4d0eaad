"""On-policy rounds (dpo_recipes/after/rounds.py): the pairing rule and its counted drops, the refusals,
and the tiny recipe's three rounds as `make iterate` runs them, judged round over round and resumed."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from data_prep.tokens import token_ids
from dpo_recipes import errors
from dpo_recipes.after import judge as judges
from dpo_recipes.after import rounds, samples, sweep, trained
from dpo_recipes.rundir import paths, planning
from dpo_recipes.sources import tiny
from dpo_recipes.training import chat, data

ROOT = Path(__file__).resolve().parents[2]


def test_each_prompt_pairs_its_best_scored_answer_against_its_worst_and_counts_what_it_drops():
    chat = [{"role": "user", "content": "Hi"}]
    found, dropped = judges.pairs(
        [chat, "Plain", chat, chat],
        [["a", "b", "c"], ["x", "y"], ["same", "same"], ["p", "q"]],
        [[0.1, 2.0, -1.0], [1.0, 0.0], [3.0, 1.0], [0.5, 0.7]],
        min_margin=0.5,
    )
    assert found == [
        {"prompt": chat, "chosen": [{"role": "assistant", "content": "b"}],
         "rejected": [{"role": "assistant", "content": "c"}]},
        {"prompt": "Plain", "chosen": " x", "rejected": " y"},
    ]  # fmt: skip
    assert dropped == {"same_answer": 1, "small_margin": 1}


class Longer:
    """A pairwise judge that prefers the longer answer and ties equal lengths; counts what it judged."""

    judged = 0

    def prefer(self, prompts, a, b):
        self.judged += len(a)
        return [0.5 if len(x) == len(y) else float(len(x) > len(y)) for x, y in zip(a, b, strict=True)], {}


class Lengths(judges.RewardJudge):
    """A reward model whose score is the answer's length."""

    def __init__(self):
        pass

    def scores(self, prompts, answers):
        return [float(len(a)) for a in answers]


def test_a_pairwise_judge_ranks_each_answer_by_its_mean_preference_over_the_prompts_others():
    texts = [["a", "bbb", "cc", "dd"], ["x", "yy"]]
    judge = Longer()
    assert judges.ranked(judge, ["p", "q"], texts) == [[0.0, 1.0, 0.5, 0.5], [0.0, 1.0]]
    assert judge.judged == 6 + 1  # every pair of a prompt's answers once (prefer judges both orders)
    assert judges.ranked(Lengths(), ["p", "q"], texts) == [[1.0, 3.0, 2.0, 2.0], [1.0, 2.0]]
    found, _ = judges.pairs(["p", "q"], texts, judges.ranked(judge, ["p", "q"], texts), min_margin=0.5)
    assert [(r["chosen"], r["rejected"]) for r in found] == [(" bbb", " a"), (" yy", " x")]


def test_a_round_is_judged_against_the_start_and_the_round_before_by_its_judges_kind(monkeypatch):
    now = {"answers": ["long answer", "mid", "same"], "scores": None}
    start = {"answers": ["short", "a", "same"], "scores": None}
    previous = {"answers": ["the longest answer", "b", "same"], "scores": None}
    loaded = []
    monkeypatch.setattr(rounds, "judge_of", lambda s: loaded.append(Longer()) or loaded[-1])
    s = SimpleNamespace(eval_prompts=["p", "q", "r"])
    versus = rounds.compared(s, now, {"vs_start": start, "vs_previous": previous})
    assert len(loaded) == 1 and loaded[0].judged == 6  # the pairwise judge, loaded once for both
    assert (versus["vs_start"]["wins"], versus["vs_start"]["ties"]) == (2, 1)
    assert (versus["vs_previous"]["wins"], versus["vs_previous"]["losses"]) == (1, 1)
    scored = {k: {**v, "scores": [float(len(a)) for a in v["answers"]]} for k, v in
              {"now": now, "start": start, "previous": previous}.items()}  # fmt: skip
    by_scores = rounds.compared(
        s, scored["now"], {"vs_start": scored["start"], "vs_previous": scored["previous"]}
    )
    assert len(loaded) == 1 and by_scores == versus  # a reward model's scores need no judge here
    first = rounds.compared(s, now, {"vs_start": start, "vs_previous": start})  # round 1
    assert loaded[-1].judged == 3 and first["vs_previous"] == first["vs_start"] == versus["vs_start"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["recipes=tiny_rounds", "judge=none"], "judge.kind=none: rounds rank each prompt's sampled answers"),
        (["recipes=tiny_rounds", "rounds.samples=1"], "rounds.samples must be at least 2"),
        (["recipes=tiny_rounds", "rounds.offline=-1"], "rounds.offline 0 or more"),
        (["recipes=tiny_kto", "judge=tiny"], "task=kto: rounds train DPO"),
    ],
)
def test_rounds_refuse_what_they_cannot_run_before_any_weight_loads(overrides, expected):
    with pytest.raises(errors.ConfigError, match=expected):
        rounds.prepare("refused", overrides)


def test_rounds_on_several_processes_need_a_hardware_option_that_launches_them():
    with pytest.raises(errors.ConfigError, match="hardware=gpu runs in one process; .* one of cpu, ddp"):
        rounds.prepare("refused", ["recipes=tiny_rounds", "hardware=gpu"], nproc=2)


def test_a_rounds_dir_refuses_another_number_of_training_processes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rounds.prepare("r", ["recipes=tiny_rounds"])
    assert rounds.prepare("r", ["recipes=tiny_rounds", "rounds.count=5"]).nproc == 1  # more rounds: the same
    with pytest.raises(errors.RunError, match="'nproc': 1}, not .*'nproc': 2}: one report would mix"):
        rounds.prepare("r", ["recipes=tiny_rounds"], nproc=2)


def test_rounds_sample_through_vllm_with_generates_token_ids_stops_and_seed(tmp_path, monkeypatch, vllm):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trained, "load", lambda *a: pytest.fail("vLLM samples without a transformers model"))
    s = rounds.prepare("v", ["recipes=tiny_rounds", "rounds.engine=vllm"])
    tokenizer = rounds.tokenizer_of(s, s.start)
    asked = s.prompts[:3]
    made = rounds.answers(s, s.start, asked, 0.7, 5, "sampling")
    ids = [token_ids(tokenizer, p) for p in asked]  # what samples.batched gives transformers' generate
    assert vllm.asked[0] == [{"prompt_token_ids": x} for x in ids]
    own = transformers.GenerationConfig.from_pretrained(s.start)
    assert vllm.asked[1] == {"temperature": 0.7, "max_tokens": s.rounds.max_new_tokens,
                               "stop_token_ids": chat.stops(tokenizer, own)}  # fmt: skip
    assert vllm.built == {"model": s.start, "revision": s.built.model.model_revision, "seed": 5,
                            "dtype": s.built.model.dtype or "auto", "trust_remote_code": False}  # fmt: skip
    assert made == [tokenizer.decode(x[-3:], skip_special_tokens=True).strip() for x in ids]


def test_the_engine_is_vllm_where_asked_or_installed_beside_a_gpu_and_a_missing_one_is_refused(
    tmp_path, monkeypatch, vllm
):
    monkeypatch.chdir(tmp_path)
    installed = sys.modules["vllm"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (samples.engine("auto"), samples.engine("transformers")) == ("transformers", "transformers")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (samples.engine("auto"), samples.engine("vllm")) == ("vllm", "vllm")
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    assert samples.engine("auto") == "transformers"
    with pytest.raises(errors.ConfigError, match="rounds.engine=vllm: vLLM is not installed here: pip"):
        rounds.prepare("v", ["recipes=tiny_rounds", "rounds.engine=vllm"])
    monkeypatch.setitem(sys.modules, "vllm", installed)
    with pytest.raises(errors.ConfigError, match="rounds.engine=fast: one of auto, vllm, transformers"):
        rounds.prepare("v", ["recipes=tiny_rounds", "rounds.engine=fast"])
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_round_adds_fresh_pairs_of_the_dataset_to_its_own_when_asked(tmp_path, monkeypatch):
    """rounds.offline=5: each round's data is its sampled pairs, then the next 5 of the dataset's pairs
    on training prompts (none on an eval prompt), counted apart in the round's report: round 2 adds the
    6th to the 10th."""
    monkeypatch.chdir(tmp_path)
    keys = ["rounds.prompts=8", "rounds.max_new_tokens=16", "rounds.offline=5"]
    s = rounds.prepare("mixed", ["recipes=tiny_rounds", *keys])
    train, held, _ = data.load(s.built.dataset, s.built.args.seed)
    unseen = {judges.unit(row["prompt"]) for row in held}
    expected = [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in train
                if judges.unit(row["prompt"]) not in unseen][:10]  # fmt: skip
    report = rounds.sampled(s, 2, s.start)
    written = rows_of(s.dir / "data" / "round-2.jsonl")
    assert report["offline"] == 5 and len(written) == report["pairs"] + 5
    assert written[report["pairs"] :] == expected[5:10]


@pytest.mark.e2e
def test_nproc_trains_each_round_on_that_many_processes(tmp_path):
    """make iterate NPROC=2: sampling and judging in the driver, the round's training launched on two
    processes (DDP over gloo) into the round's run dir, whose record says so."""
    short = ["rounds.count=1", "rounds.prompts=16", "rounds.max_new_tokens=16", "rounds.eval_prompts=8",
             "train.max_steps=4", "train.eval_steps=2"]  # fmt: skip
    with socket.socket() as free:  # another test file's processes may hold the default port
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    done = iterate(tmp_path, "--nproc", "2", "--main-port", str(port), *short)
    assert done.returncode == 0, done.stderr[-3000:]
    where = tmp_path / "outputs" / "tiny_rounds" / "r"
    report = json.loads((where / "rounds.json").read_text())
    assert report["nproc"] == 2 and [r["round"] for r in report["rounds"]] == [1]
    assert [planning.read_launch(r).world for r in paths.records(where / "round-1")] == [2]
    assert paths.summary(where / "round-1")["status"] == "finished"


@pytest.mark.slow
def test_a_round_pairs_answers_by_a_pairwise_judge(tmp_path, monkeypatch):
    """judge.kind=pairwise with the tiny Llama judging its own answers (as self-rewarding models do): two
    answers a prompt, so each kept pair's chosen answer is the one the judge prefers to its rejected."""
    monkeypatch.chdir(tmp_path)
    keys = ["judge.kind=pairwise", f"judge.path={tiny.path()}", "rounds.samples=2", "rounds.prompts=8",
            "rounds.max_new_tokens=16"]  # fmt: skip
    s = rounds.prepare("pairwise", ["recipes=tiny_rounds", *keys])
    report = rounds.sampled(s, 1, s.start)
    written = rows_of(s.dir / "data" / "round-1.jsonl")
    assert len(written) == report["pairs"] and report["pairs"] + sum(report["dropped"].values()) == 8
    assert all(0 <= q <= 1 for q in report["judge_scores"]["quartiles"])
    judge = judges.load("pairwise", str(tiny.path()))
    text = [[judges.text(row[side]) for row in written] for side in ("chosen", "rejected")]
    prefs, _ = judge.prefer([row["prompt"] for row in written], *text)
    assert written and min(prefs) > 0.5 - 1e-5, prefs  # batched otherwise, so the last digits may differ


def command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "dpo_recipes.after.rounds", "--name", "r", "recipes=tiny_rounds", *extra]


def env() -> dict:
    """The test's environment (its cache of tiny models among it), as it is when the test runs."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def iterate(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(*extra), cwd=cwd, capture_output=True, text=True, env=env())


def killed_mid_training(cwd: Path, run_dir: Path, step: int) -> None:
    """`make iterate` killed (SIGKILL, the training process with it) once `run_dir` holds a checkpoint of
    `step` or later."""
    process = subprocess.Popen(command(), cwd=cwd, env=env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while not any(paths.complete(c) and paths.step(c) >= step for c in paths.checkpoints(run_dir)):
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{run_dir} never saved a checkpoint"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def numbers(report: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in report]


@pytest.mark.e2e
def test_three_rounds_of_the_tiny_recipe_learn_from_their_own_answers_and_resume(tmp_path):
    """From the tiny base, on its own sampled answers and the tiny judge only: the first round's greedy
    answers beat the start's with the interval above 1/2, the last round's at 0.8 or more (BENCHMARKS.md,
    Rounds: round 1 at 0.67-0.93, its lower bound 0.55 or more, round 3 at 0.95-0.99, over three seeds and
    two builds of the tiny models). make eval judges a round against the round before; the sweep report
    reads the rounds. A
    round killed mid-training resumes from its checkpoint to the same numbers; a finished round is not
    trained again; other settings in the same dir are refused."""
    done = iterate(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    where = tmp_path / "outputs" / "tiny_rounds" / "r"
    report = json.loads((where / "rounds.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    first, last = report["rounds"][0]["vs_start"], report["rounds"][-1]["vs_start"]
    assert first["interval"][0] > 0.5 and last["win_rate"] >= 0.8 and last["interval"][0] > 0.5, report[
        "rounds"
    ]
    assert all(f"round {r}: win rate vs start" in done.stdout for r in (1, 2, 3))
    held_out = {judges.unit(row["prompt"]) for row in rows_of(where / "data" / "eval.jsonl")}
    for r in report["rounds"]:
        rows = rows_of(where / "data" / f"round-{r['round']}.jsonl")
        assert len(rows) == r["sampled"]["pairs"] and not held_out & {judges.unit(x["prompt"]) for x in rows}
        assert (
            json.loads((tmp_path / r["run"] / "dpo_metrics" / "summary.json").read_text())["status"]
            == "finished"
        )
    assert (where / "rounds.png").stat().st_size > 0 and (where / "rounds.md").exists()

    evaluated = subprocess.run([sys.executable, "-m", "dpo_recipes.after.evaluate", str(where / "round-2"), "--n", "64"],
                               cwd=tmp_path, capture_output=True, text=True, env=env())  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    judged = json.loads((where / "round-2" / "dpo_metrics" / "eval.json").read_text())
    # make eval's reference is round 2's: round 1 merged, its adapter off; its answers come from the
    # unmerged adapter in other batches, so a greedy answer may differ from the driver's
    versus = judged["comparisons"]["policy_vs_reference"]
    assert (
        judged["prompts"] == 64
        and abs(versus["win_rate"] - report["rounds"][1]["vs_previous"]["win_rate"]) <= 0.1
    )

    finished = {r: (where / f"round-{r}" / "dpo_metrics" / "summary.json").read_text() for r in (1, 2)}
    shutil.rmtree(where / "round-3")
    (where / "data" / "answers-round-3.json").unlink()
    killed_mid_training(tmp_path, where / "round-3", 250)  # of 300: the resumed run trains the last 50
    assert paths.summary(where / "round-3").get("status") != "finished"
    again = iterate(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {where.absolute() / 'round-3' / 'checkpoint-'}" in again.stdout
    assert again.stdout.count("run finished") == 1  # round 3 alone; a finished round is not trained again
    assert finished == {
        r: (where / f"round-{r}" / "dpo_metrics" / "summary.json").read_text() for r in (1, 2)
    }
    resumed = json.loads((where / "rounds.json").read_text())["rounds"]
    assert numbers(resumed) == numbers(report["rounds"])
    assert sweep.main([str(where.parent)]) == 0  # make sweep-report DIR=outputs/tiny_rounds
    compared = json.loads((where.parent / "sweep_summary.json").read_text())["runs"]
    assert [(r["rounds"], r["win_rate_vs_start"]) for r in compared] == [
        (3, resumed[-1]["vs_start"]["win_rate"])
    ]
    mixed = iterate(tmp_path, "rounds.samples=3")
    assert mixed.returncode == 2 and "one report would mix two experiments" in mixed.stderr
