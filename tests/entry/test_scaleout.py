"""Several processes keep what a run promises: `make train NPROC=2` trains as one process with the same
global batch; a Ctrl-C under it stops every rank at one step with a checkpoint and a hint that resumes
the same launch to the uninterrupted run's losses; a signal to one rank stops them all; an overwritten
run is replaced whole."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest
import torch
from conftest import LAYOUT, tiny_overrides

from dpo_recipes import ROOT, config, train
from dpo_recipes.after import export
from dpo_recipes.rundir import paths, planning

# Sigmoid alone: an NLL term (the default recipe's rpo_strong) is a per-token mean on each process, which is
# not the mean over both processes' tokens, so two processes and one legitimately differ with it.
SMALL = (
    "dataset.max_samples=256 dataset.eval_path=null train.max_steps=24 train.save_steps=1000 "
    "train.logging_steps=1 train.eval_strategy=no train.disable_tqdm=true loss=sigmoid"
)
# tiny_lora_dpo at a tenth of its learning rate where losses are compared: at its own, the run crosses a
# tipping point (where it learns to read the asked-for mood) that amplifies float rounding, so runs that
# round apart (two half-batches summed, other thread counts) part by up to 3e-2 there
CALM = {"tiny_lora_dpo": "train.learning_rate=5e-4", "tiny_full_dpo": ""}


def make_train(name: str, *extra: str) -> subprocess.Popen:
    """`make train NPROC=2` in a process group of its own, as a terminal runs it."""
    cmd = ["make", "--no-print-directory", "train", "NPROC=2", "HARDWARE=cpu", f"RUN={name}", *extra]
    env = {k: v for k, v in os.environ.items() if k != "DPO_RUN_STAMP"}  # each launch its own time
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def losses_of(history: list[dict]) -> dict:
    return {e["step"]: e["loss"] for e in history if "loss" in e}


def losses(run_dir) -> dict:
    return losses_of(json.loads((run_dir / "dpo_metrics/log_history.json").read_text()))


def wait_for_steps(run_dir, process, steps: int = 3, timeout: float = 300) -> None:
    csv = run_dir / "dpo_metrics/training_metrics.csv"
    deadline = time.monotonic() + timeout
    while not (csv.exists() and len(csv.read_text().splitlines()) > steps):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.fixture
def names():
    made = []
    yield lambda: made.append(f"test-{uuid.uuid4().hex[:8]}") or made[-1]
    for name in made:
        for run_dir in (ROOT / "outputs").glob(f"*/{name}"):
            shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.e2e
def test_two_processes_train_as_one_with_the_same_global_batch_and_ctrl_c_resumes_them(names, tmp_path):
    """`make train NPROC=2` stopped by a Ctrl-C and resumed with the printed hint: every rank stops at one
    step, and each of the launch's 24 steps, before the stop and after the resume, gives one process's
    loss at the same global batch (2 x 8 = 16)."""
    stopped = names()
    run_dir = ROOT / "outputs/tiny_lora_dpo" / stopped
    # Padded: the layouts attend in buckets drawn from each micro-batch's rows, so 2 x 8 and 1 x 16 round
    # further apart (measured 2.0e-3 by step 24); the layouts' own runs are compared in test_packing.py.
    small = " ".join([SMALL, CALM["tiny_lora_dpo"], *LAYOUT["padded"]])
    cfg, recipe = config.compose([*small.split(), "hardware=cpu", "train.per_device_train_batch_size=16"])
    one = train.run(cfg, tmp_path / "one", recipe).state.log_history
    process = make_train(stopped, f"ARGS={small}")
    wait_for_steps(run_dir, process)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    out, err = process.communicate(timeout=300)
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    steps = re.findall(r"SIGINT at step (\d+): checkpoint saved", err)
    assert len(steps) == 2 and len(set(steps)) == 1, err[-3000:]  # both ranks, the same step
    step = int(steps[0])
    assert paths.complete(run_dir / f"checkpoint-{step}") and step < 24
    assert paths.summary(run_dir)["status"] == "interrupted" and paths.summary(run_dir)["signal"] == "SIGINT"
    hint = err.split("resume with ")[1].split("  (or")[0]
    assert hint == f"make train RECIPE=tiny_lora_dpo RUN={stopped} HARDWARE=cpu NPROC=2"
    resumed = subprocess.run(shlex.split(hint), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = paths.summary(run_dir)
    assert summary["status"] == "finished"
    assert summary["epochs"] == pytest.approx(24 * 2 * 8 / 256)  # global batch = 2 processes x 8
    got, reference = losses(run_dir), losses_of(one)
    assert sorted(got) == sorted(reference) == list(range(1, 25))
    for s in reference:  # gloo's sum of two half-batches rounds apart from one batch: under 1e-6 here
        assert got[s] == pytest.approx(reference[s], abs=1e-5), s
    records = paths.records(run_dir)
    assert len(records) == 2  # the first launch and the resume: no record from the second rank
    assert all(planning.read_launch(r).world == 2 for r in records)
    assert list(run_dir.glob("**/summary.json")) == [run_dir / "dpo_metrics" / "summary.json"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "recipe, extra",
    [
        ("tiny_kto", []),  # the KL estimate is gathered over both processes' rows, as over one batch
        ("tiny_simpo", ["train.cpo_alpha=0"]),  # cpo_alpha's NLL term is a per-process token mean
        ("tiny_sft", []),  # the LM loss over the tokens of both processes (average_tokens_across_devices)
    ],
)
def test_each_method_trains_under_two_processes_as_one_process(recipe, extra, names, tmp_path):
    """KTO, SimPO and SFT under `make train NPROC=2`: each of 6 steps gives one process's loss at the
    same global batch (2 x 8 = 16) within 1e-5 (measured under 1e-6). ORPO is left out: its NLL term is a
    per-process token mean, so two processes part from one by 3.7e-4 at step 1 (as DPO's rpo_strong)."""
    name = names()
    small = [*SMALL.replace("max_steps=24", "max_steps=6").replace(" loss=sigmoid", "").split(), *extra]
    cfg, _ = config.compose(
        [f"recipes={recipe}", *small, "hardware=cpu", "train.per_device_train_batch_size=16"]
    )
    one = losses_of(train.run(cfg, tmp_path / "one", recipe).state.log_history)
    process = make_train(name, f"RECIPE={recipe}", f"ARGS={' '.join(small)}")
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    run_dir = ROOT / "outputs" / recipe / name
    assert paths.summary(run_dir)["epochs"] == pytest.approx(paths.summary(tmp_path / "one")["epochs"])
    got = losses(run_dir)
    assert sorted(got) == sorted(one) == list(range(1, 7))
    for step in one:
        assert got[step] == pytest.approx(one[step], abs=1e-5), step


# DeepSpeed on CPU processes: its CPU accelerator over gloo, fp32 (the options as shipped, run on CPU)
DEEPSPEED_CPU = "hardware.device=cpu train.ddp_backend=gloo train.bf16=false"


@pytest.mark.e2e
@pytest.mark.parametrize("stage, recipe", [(2, "tiny_lora_dpo"), (3, "tiny_full_dpo")])
def test_deepspeed_zero_on_two_cpu_processes_trains_as_one_process_and_resumes(
    stage, recipe, names, tmp_path
):
    """`make train HARDWARE=zero2|zero3 NPROC=2` on CPU: stopped by a Ctrl-C to the launch's process
    group, every rank leaves the same complete checkpoint; the printed hint resumes it; the 20 steps' losses
    and grad norms are one process's at the same global batch (2 x 2 = 4) within 1e-4; the final save loads
    with from_pretrained and gives the one-process run's logits."""
    from transformers import AutoModelForCausalLM

    name = names()
    run_dir = ROOT / f"outputs/{recipe}" / name
    steps = SMALL.replace("max_steps=24", "max_steps=20").replace("save_steps=1000", "save_steps=5")
    small = " ".join(
        [
            steps,
            CALM[recipe],
            *LAYOUT["padded"],
            "train.per_device_train_batch_size=2",
            "train.gradient_accumulation_steps=1",
        ]
    )
    cfg, _ = config.compose([f"recipes={recipe}", *small.split(), "hardware=cpu"])
    cfg.train.per_device_train_batch_size = 4
    trainer = train.run(cfg, tmp_path / "one", recipe)
    one = trainer.state.log_history
    process = make_train(name, f"RECIPE={recipe}", f"HARDWARE=zero{stage}", f"ARGS={small} {DEEPSPEED_CPU}")
    wait_for_steps(run_dir, process, steps=6)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=300)
    stopped = re.findall(r"SIGINT at step (\d+): checkpoint saved", err)
    assert len(stopped) == 2 and len(set(stopped)) == 1, err[-3000:]
    checkpoint = run_dir / f"checkpoint-{stopped[0]}"
    assert paths.complete(checkpoint) and {p.name for p in checkpoint.glob("rng_state_*.pth")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }
    hint = err.split("resume with ")[1].split("  (or")[0]
    assert hint == f"make train RECIPE={recipe} RUN={name} HARDWARE=zero{stage} NPROC=2"
    resumed = subprocess.run(shlex.split(hint), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert paths.summary(run_dir)["status"] == "finished"
    history = json.loads((run_dir / "dpo_metrics/log_history.json").read_text())
    for key in ("loss", "grad_norm"):
        got, expected = ({e["step"]: e[key] for e in h if key in e} for h in (history, one))
        assert sorted(got) == sorted(expected) == list(range(1, 21)), key
        for step in expected:
            # ZeRO-2 (an adapter) measured within 2e-7; ZeRO-3 sums each weight's shards apart, further
            assert got[step] == pytest.approx(expected[step], abs=1e-4), (key, step)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    if recipe == "tiny_full_dpo":  # the weights ZeRO-3 gathered on saving
        saved = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    else:  # the LoRA adapter saved beside its base
        from peft import AutoPeftModelForCausalLM

        saved = AutoPeftModelForCausalLM.from_pretrained(run_dir).eval()
    with torch.no_grad():
        assert torch.allclose(saved(ids).logits, trainer.model.eval()(ids).logits, atol=1e-4)


@pytest.mark.e2e
@pytest.mark.parametrize("hardware", ["cpu", "zero2"])
def test_two_nodes_on_one_machine_train_as_two_processes_of_one_node(hardware, names, tmp_path):
    """`make train NNODES=2 NODE_RANK=0|1 NPROC=1` twice on localhost, one RUN, DDP and DeepSpeed ZeRO-2
    (each node starting its own process): one run dir with one summary and one launch record, and the
    losses of one process at the same global batch (2 x 8)."""
    import socket

    name = names()
    run_dir = ROOT / "outputs/tiny_lora_dpo" / name
    small = " ".join([SMALL.replace("max_steps=24", "max_steps=8"), *LAYOUT["padded"]])
    cfg, recipe = config.compose([*small.split(), "hardware=cpu", "train.per_device_train_batch_size=16"])
    if hardware != "cpu":
        small += f" {DEEPSPEED_CPU} train.per_device_train_batch_size=8 train.gradient_accumulation_steps=1"
    one = {
        e["step"]: e["loss"]
        for e in train.run(cfg, tmp_path / "one", recipe).state.log_history
        if "loss" in e
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [
        make_train(
            name,
            f"ARGS={small}",
            "NPROC=1",
            "NNODES=2",
            f"NODE_RANK={rank}",
            f"MAIN_PORT={port}",
            f"HARDWARE={hardware}",
        )
        for rank in (0, 1)
    ]
    try:
        done = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in done]
    summary = paths.summary(run_dir)
    assert summary["status"] == "finished" and summary["launch"] == f"HARDWARE={hardware} NPROC=1 NNODES=2"
    assert [planning.read_launch(r).world for r in paths.records(run_dir)] == [2]
    assert list(run_dir.glob("**/summary.json")) == [run_dir / "dpo_metrics" / "summary.json"]
    got = losses(run_dir)
    assert sorted(got) == sorted(one) == list(range(1, 9))
    for step in one:
        assert got[step] == pytest.approx(one[step], abs=5e-4), step


@pytest.mark.e2e
def test_judging_while_training_under_two_processes_finishes_and_exports_the_best_step(names, tmp_path):
    """judge.every under `make train NPROC=2`: the first process judges and every process takes its
    numbers, so both agree on the best step and reach each checkpoint's save together (a rank waiting
    alone at a barrier hung the run)."""
    name = names()
    run_dir = ROOT / "outputs/tiny_lora_dpo" / name
    args = "dataset.max_samples=128 train.max_steps=20 train.eval_steps=10 train.save_steps=10 "
    args += "train.logging_steps=5 judge.every=10 judge.prompts=8 train.disable_tqdm=true"
    process = make_train(name, f"ARGS={args}")
    try:
        _, err = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, err[-3000:]
    for step in (10, 20):
        checkpoint = run_dir / f"checkpoint-{step}"
        assert paths.complete(checkpoint) and (checkpoint / "rng_state_1.pth").exists(), step
    rows = json.loads((run_dir / "dpo_metrics/log_history.json").read_text())
    judged = {e["step"]: e["eval_judge/win_rate"] for e in rows if "eval_judge/win_rate" in e}
    assert sorted(judged) == [10, 20]
    best = paths.summary(run_dir)["best"]["eval_judge/win_rate"]
    step = max(judged, key=lambda s: (judged[s], -s))
    assert best == {"value": judged[step], "step": step}
    state = json.loads((run_dir / "checkpoint-20/trainer_state.json").read_text())
    assert state["best_global_step"] == step
    out = tmp_path / "best"
    assert export.main([str(run_dir), "--checkpoint", "best", "--out", str(out)]) == 0
    assert (f"the weights of checkpoint-{step}" in (out / "README.md").read_text()) == (step != 20)


@pytest.mark.e2e
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(names):
    name = names()
    run_dir = ROOT / "outputs/tiny_lora_dpo" / name
    cmd = [
        sys.executable,
        "-m",
        "dpo_recipes.launch",
        "--nproc",
        "2",
        "recipes=tiny_lora_dpo",
        "hardware=cpu",
    ]
    cmd += [f"run.name={name}", *SMALL.split()]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(run_dir, process)
    (accelerate,) = psutil.Process(process.pid).children()
    workers = accelerate.children()
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGTERM)  # one rank only, as a node's scheduler might
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    steps = re.findall(r"SIGTERM at step (\d+): checkpoint saved", err)
    assert len(steps) == 2 and len(set(steps)) == 1, err[-3000:]
    assert f"run dir (every process, every node): {run_dir}" in out
    assert paths.complete(run_dir / f"checkpoint-{steps[0]}")


@pytest.mark.e2e
def test_overwrite_replaces_a_lora_run_with_a_full_run_that_export_and_samples_use(tmp_path):
    from transformers import AutoModelForCausalLM

    from dpo_recipes.after import trained

    run_dir = tmp_path / "run"
    for recipe, extra in (("tiny_lora_dpo", []), ("tiny_full_dpo", ["run.overwrite=true"])):
        cfg, name = config.compose(tiny_overrides(recipe, *extra))
        trainer = train.run(cfg, run_dir, name)
    assert not (run_dir / "adapter_config.json").exists() and (run_dir / "model.safetensors").exists()
    run = trained.open_run(run_dir)
    assert not run.lora
    out = tmp_path / "export"
    assert export.main([str(run_dir), "--out", str(out)]) == 0
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        policy = trained.policy(run)(ids).logits
        assert torch.allclose(exported, policy, atol=1e-5)
        assert torch.allclose(policy, trainer.model.eval()(ids).logits, atol=1e-5)


@pytest.mark.e2e
@pytest.mark.gpu
def test_an_fsdp_run_saves_full_weights_that_load(names):
    """On a CUDA machine: `HARDWARE=fsdp NPROC=1` on the tiny Qwen for 2 steps ends with a model in the
    run dir that from_pretrained loads, its tokenizer beside it, and a finished summary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = names()
    cmd = [sys.executable, "-m", "dpo_recipes.launch", "--nproc", "1", "recipes=qwen7b_full_dpo"]
    # the smoke's weights and data on the GPUs: +smoke=tiny_qwen itself runs one CPU process
    cmd += ["model.model_name_or_path=${tiny_qwen:}", "dataset=real_ultrafeedback", "logger=none"]
    cmd += ["hardware=fsdp", "train.max_steps=2", "dataset.max_eval_samples=4", f"run.name={name}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = ROOT / "outputs/qwen7b_full_dpo" / name
    assert paths.summary(run_dir)["status"] == "finished" and paths.missing_weights(run_dir) == []
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    assert model.num_parameters() > 0 and AutoTokenizer.from_pretrained(run_dir).eos_token == "<|im_end|>"
    shutil.rmtree(run_dir, ignore_errors=True)
