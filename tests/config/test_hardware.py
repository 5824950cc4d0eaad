"""Hardware options and scale-out through accelerate; wandb and TensorBoard logging."""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import launch_command_parser
from conftest import python_m, tiny_overrides

from dpo_recipes import ROOT, config, errors, launch
from dpo_recipes.sources import tiny

HARDWARE = sorted(p.stem for p in (config.CONF_DIR / "hardware").glob("*.yaml"))
ACCELERATE = ROOT / "accelerate"


def test_the_options_the_project_promises():
    assert {"cpu", "gpu", "ddp", "zero2", "zero3", "zero3_offload", "fsdp"} <= set(HARDWARE)


@pytest.mark.parametrize("option", HARDWARE)
def test_every_option_composes_and_validates(option, tmp_path):
    cfg, _ = config.compose([f"hardware={option}"])
    config.build(cfg, tmp_path, machine=False)  # the config itself is sound
    problems = []
    try:
        config.check(cfg)  # and this machine and launch: one process, maybe no DeepSpeed
    except errors.ConfigError as err:
        problems = err.problems
    launcher = f"hardware={option} runs through accelerate: make train HARDWARE={option} NPROC=<processes>"
    deepspeed = f'hardware={option} needs DeepSpeed: pip install -e ".[deepspeed]"'
    expected = (
        [deepspeed]
        if cfg.hardware.engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None
        else []
    )
    no_gpu = cfg.hardware.device == "cuda" and not torch.cuda.is_available()
    expected += (
        [
            "hardware: this recipe trains on a CUDA GPU (bf16) and none is visible here; "
            "to run it on this machine add the override hardware=cpu"
        ]
        if no_gpu
        else []
    )
    expected += [launcher] if cfg.hardware.engine != "single" and "WORLD_SIZE" not in os.environ else []
    assert problems == expected
    if cfg.hardware.accelerate_config:
        assert Path(cfg.hardware.accelerate_config).is_file()


@pytest.mark.parametrize("option", HARDWARE)
def test_accelerate_configs_name_settings_accelerate_knows(option):
    hardware = config.compose([f"hardware={option}"])[0].hardware
    if not hardware.accelerate_config:
        return
    path = Path(hardware.accelerate_config)
    cluster = ClusterConfig.from_yaml_file(str(path))  # rejects unknown top-level keys
    launch_options = {action.dest for action in launch_command_parser()._actions}
    raw = yaml.safe_load(path.read_text())
    for key in [*raw.get("deepspeed_config", {}), *raw.get("fsdp_config", {})]:
        assert key in launch_options, f"{path.name}: accelerate launch has no --{key}"
    assert bool(cluster.deepspeed_config) == (hardware.engine == "deepspeed") == bool(hardware.zero_stage)
    if cluster.deepspeed_config:
        ds = json.loads((ROOT / cluster.deepspeed_config["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] == hardware.zero_stage
        assert ds["gradient_accumulation_steps"] == ds["train_micro_batch_size_per_gpu"] == "auto"


@pytest.mark.parametrize("option", [o for o in HARDWARE if o.startswith("zero")])
def test_deepspeed_over_two_nodes_starts_each_nodes_processes_on_that_node(option):
    """accelerate's default multi-node DeepSpeed launcher runs `deepspeed --launcher pdsh` from the first
    node (ignoring --machine_rank; the workers grandchildren no forwarded signal reaches); the options
    name the standard one: each node's own torch.distributed.run, as launch.py starts a node."""
    from accelerate.commands.launch import _validate_launch_command
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    cmd = launch.command([f"hardware={option}"], 1, 2, 1, "10.0.0.1")
    start = cmd.index("accelerate.commands.launch") + 1
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[start:]))
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch does
    assert args.deepspeed_multinode_launcher == "standard" and args.machine_rank == 1
    assert prepare_deepspeed_cmd_env(args)[0] is None  # torch.distributed.run on this node
    args.deepspeed_multinode_launcher = None  # accelerate's default
    assert prepare_deepspeed_cmd_env(args)[0][:1] == ["deepspeed"]


def make_dry_run(*args) -> str:
    """The command `make train` would run (run from inside `make test` too, hence --no-print-directory)."""
    cmd = ["make", "--no-print-directory", "-n", "train", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout
    return next(line for line in out.splitlines() if "dpo_recipes." in line)


@pytest.mark.e2e
def test_make_launches_through_the_launcher_with_its_settings():
    line = make_dry_run("HARDWARE=zero3", "NPROC=8", "NNODES=2", "NODE_RANK=1", "MAIN_ADDR=10.1.2.3")
    assert "-m dpo_recipes.launch --nproc 8 --nnodes 2 --node-rank 1 --main-addr 10.1.2.3" in line
    assert line.rstrip().endswith("recipes=tiny_lora_dpo hardware=zero3")
    plain = make_dry_run("HARDWARE=gpu")
    assert "launch" not in plain and "dpo_recipes.train recipes=tiny_lora_dpo hardware=gpu" in plain


def test_the_launch_uses_the_accelerate_config_the_composed_option_names():
    cmd = launch.command(["recipes=qwen7b_full_dpo", "hardware=fsdp"], 2, 2, 1, "10.0.0.1")
    config_file = cmd[cmd.index("--config_file") + 1]
    assert config_file == str(ACCELERATE / "fsdp.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[cmd.index("--machine_rank") + 1] == "1"
    assert cmd[-3:] == ["dpo_recipes.train", "recipes=qwen7b_full_dpo", "hardware=fsdp"]
    zero3 = launch.command(["hardware=zero3", "train.max_steps=3"], 8)
    assert zero3[zero3.index("--config_file") + 1] == str(ACCELERATE / "zero3.yaml")
    assert zero3[-1] == "++train.max_steps=3"


def test_launching_a_one_process_option_is_refused_with_the_options_that_scale_out():
    with pytest.raises(errors.ConfigError) as err:
        launch.command(["recipes=qwen7b_lora_dpo"], 8)  # the recipe's hardware is gpu: one process
    assert "hardware=gpu runs in one process; to launch 8 use one of: cpu, ddp, fsdp, zero2" in str(err.value)
    assert launch.main(["--nproc", "2", "recipes=qwen7b_lora_dpo"]) == 2


def test_sharding_options_refuse_the_cpu():
    """accelerate applies FSDP and DeepSpeed only on GPUs; with use_cpu it silently runs plain data parallel."""
    found = problems(["hardware=fsdp", "train.use_cpu=true"], WORLD_SIZE="2", DPO_RUN_STAMP="x")
    assert "hardware=fsdp shards on GPUs only" in found and "hardware=cpu" in found


def fsdp_wrapped(monkeypatch) -> list[str]:
    """The classes of the tiny Qwen's modules that accelerate's FSDP2 wrapping policy picks, with the
    `fsdp` option's accelerate config turned into the environment accelerate launch gives each rank."""
    from accelerate.commands.launch import _validate_launch_command
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env
    from transformers import AutoModelForCausalLM

    argv = ["--config_file", str(ACCELERATE / "fsdp.yaml"), "--num_processes", "2", "-m", "dpo_recipes.train"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    model = AutoModelForCausalLM.from_pretrained(tiny.qwen_path())
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    return [type(m).__name__ for m in model.modules() if policy(m)]


@pytest.mark.slow
def test_fsdp_wraps_each_qwen2_decoder_layer(monkeypatch):
    assert fsdp_wrapped(monkeypatch) == ["Qwen2DecoderLayer"] * tiny.QWEN["num_hidden_layers"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.e2e
def test_fsdp2_sharding_on_two_cpu_processes_matches_one_process_with_and_without_the_layouts(
    monkeypatch, tmp_path
):
    """The layouts (padding-free, prompt shared) under FSDP2 give the padded batch's log-probs (1e-5
    relative) and losses (1e-4), as does sharding itself against one process."""
    classes, script = (
        ",".join(sorted(set(fsdp_wrapped(monkeypatch)))),
        ROOT / "tests" / "config" / "fsdp_cpu.py",
    )
    results = {}
    for world, layout in ((1, "padded"), (2, "padded"), (2, "both")):
        out = tmp_path / f"{world}-{layout}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world)]
        cmd += ["--master_port", str(free_port()), str(script), str(out), classes, layout]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        # Rank 0 writes the result after the last all_gather, when every rank has finished its steps.
        # gloo's teardown after that has aborted a process now and then ("terminate called without
        # an active exception"), which says nothing of the numbers: only a missing result fails here.
        assert done.returncode == 0 or out.exists(), done.stderr[-3000:]
        results[world, layout] = json.loads(out.read_text())
    one, two, both = results[1, "padded"], results[2, "padded"], results[2, "both"]
    for sharded in (two, both):
        assert sharded["root"] == "FSDPQwen2ForCausalLM"
        assert sharded["embedding_rows_per_rank"] == tiny.QWEN["vocab_size"] // 2  # each rank holds half
    assert one["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert both["first_logps"] == pytest.approx(two["first_logps"], rel=1e-5)
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-4)
    assert both["losses"] == pytest.approx(one["losses"], abs=1e-4)
    assert one["losses"][-1] < one["losses"][0]


def problems(overrides, **env):
    cfg, _ = config.compose(overrides)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value) if value is not None else mp.delenv(key, raising=False)
        try:
            config.check(cfg)
        except errors.ConfigError as err:
            return "\n".join(err.problems)
    return ""


def test_distributed_options_need_a_launcher():
    assert "make train HARDWARE=fsdp NPROC=<processes>" in problems(["hardware=fsdp"], WORLD_SIZE=None)


def test_ranks_need_one_run_dir():
    found = problems(["hardware=cpu"], WORLD_SIZE="2", DPO_RUN_STAMP=None)
    assert "several processes need one run dir" in found
    assert problems(["hardware=cpu", "run.name=x"], WORLD_SIZE="2", DPO_RUN_STAMP=None) == ""


def test_several_gpus_visible_to_one_process_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert "4 GPUs are visible to one process" in problems(["hardware=gpu"], WORLD_SIZE=None)


def test_zero3_lora_with_non_reentrant_checkpointing_is_refused():
    overrides = ["hardware=zero3", "train.activation_checkpointing_kwargs.use_reentrant=false"]
    assert "needs use_reentrant=true" in problems(overrides, WORLD_SIZE="2", DPO_RUN_STAMP="x")


def test_secrets_stay_out_of_the_config():
    assert "train.hub_token: holds a secret" in problems(["+train.hub_token=hf_abc"])


def test_wandb_online_without_login_gives_a_hint(tmp_path):
    found = problems(["logger=wandb"], WANDB_API_KEY=None, WANDB_MODE=None, HOME=str(tmp_path))
    assert "logger=wandb: not logged in; run `wandb login`" in found and "WANDB_MODE=offline" in found
    assert problems(["logger=wandb"], WANDB_API_KEY=None, WANDB_MODE="offline", HOME=str(tmp_path)) == ""


def test_recipes_pick_their_loggers():
    assert config.compose(["recipes=tiny_lora_dpo"])[0].logger.name == "none"
    assert config.compose(["recipes=qwen7b_lora_dpo"])[0].logger.name == "wandb"


def train_cli(run_dir, *overrides, launcher=(), env=None):
    common = [
        "dataset.max_samples=256",
        "dataset.eval_path=null",
        "train.max_steps=8",
        "train.logging_steps=1",
    ]
    common += ["train.eval_strategy=no", "train.disable_tqdm=true", "train.save_strategy=no", "hardware=cpu"]
    cmd = [
        sys.executable,
        *launcher,
        "-m",
        "dpo_recipes.train",
        *common,
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((run_dir / "dpo_metrics" / "log_history.json").read_text())


@pytest.mark.e2e
def test_offline_wandb_run_holds_the_dpo_metrics_and_no_secret(tmp_path):
    secret = "sekrit-key-0123456789"
    train_cli(tmp_path / "run", "logger=wandb", env={"WANDB_MODE": "offline", "WANDB_API_KEY": secret})
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and b"rewards/margins" in runs[0].read_bytes()
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".log", ".csv", ".txt"):
            assert secret not in path.read_text(errors="ignore"), path


@pytest.mark.e2e
def test_tensorboard_run_writes_event_files_with_the_dpo_metrics(tmp_path):
    out = python_m(
        "dpo_recipes.train",
        *tiny_overrides("tiny_lora_dpo"),
        "logger=tensorboard",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events and any(b"rewards/margins" in e.read_bytes() for e in events)


@pytest.mark.parametrize(
    "ranks, jobs, cores, threads", [(None, None, 2, 2), ("2", None, 2, 1), (None, 2, 2, 1), ("2", 2, 16, 4)]
)
def test_each_rank_or_job_takes_its_share_of_the_cores(ranks, jobs, cores, threads, monkeypatch):
    from types import SimpleNamespace

    from hydra.types import RunMode

    from dpo_recipes import train

    monkeypatch.setattr(train, "usable_cores", lambda: cores)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    if ranks:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
    hydra = SimpleNamespace(mode=RunMode.MULTIRUN if jobs else RunMode.RUN, launcher={"n_jobs": jobs})
    monkeypatch.setattr(train.HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(train.HydraConfig, "get", staticmethod(lambda: hydra))
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))  # restored after the test
    try:
        assert train.share_cores() == threads
        assert torch.get_num_threads() == threads and os.environ["OMP_NUM_THREADS"] == str(threads)
    finally:
        torch.set_num_threads(before)
