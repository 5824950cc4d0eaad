"""The `dpo-recipes` command: a user's own options before the shipped ones, a recipe file from any path,
a starter in an empty folder, and the wheel, installed without the clone, running from an empty folder."""

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from dpo_recipes import ROOT, cli, config

LOCAL = (".git", ".venv", "build", "*.egg-info", "outputs", "multirun", "__pycache__", ".*_cache")


@pytest.fixture
def own(tmp_path, monkeypatch):
    """An empty project folder as the current directory, the cache kept away from the session's."""
    folder = tmp_path / "project"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.delenv("DPO_RECIPES_CONFIG", raising=False)
    return folder


def test_init_writes_a_starter_once_and_refuses_to_write_over_it(own, capsys):
    assert cli.main(["init"]) == 0
    assert sorted(str(p.relative_to(own)) for p in own.rglob("*.yaml")) == sorted(cli.STARTER)
    (own / "recipes/my_recipe.yaml").write_text("# mine\n")
    assert cli.main(["init"]) == 2
    assert "already exist; nothing written" in capsys.readouterr().err
    assert (own / "recipes/my_recipe.yaml").read_text() == "# mine\n"


def test_own_options_win_over_the_shipped_ones_of_the_same_name(own, monkeypatch):
    assert cli.main(["init"]) == 0
    (own / "conf/dataset/toy.yaml").write_text("path: mine.jsonl\nformat: alpaca\n")  # a shipped name
    monkeypatch.setenv("DPO_RECIPES_CONFIG", str(own))
    cfg, recipe = config.compose(["recipes=my_recipe"])
    assert recipe == "my_recipe" and cfg.dataset.path.endswith("data/toy/train.jsonl")  # my_data
    cfg, _ = config.compose(["recipes=my_recipe", "dataset=toy"])
    assert (cfg.dataset.path, cfg.dataset.format) == ("mine.jsonl", "alpaca")
    monkeypatch.delenv("DPO_RECIPES_CONFIG")
    cfg, _ = config.compose(["dataset=toy"])
    assert cfg.dataset.path == str(ROOT / "data/toy/train.jsonl")


@pytest.mark.parametrize(
    "argv, recipe_arg",
    [
        (["qwen7b_lora_dpo", "train.beta=0.2"], "recipes=qwen7b_lora_dpo"),
        (["train.beta=0.2"], "train.beta=0.2"),
        (["-m", "train.beta=0.1,0.2"], "-m"),
    ],
)
def test_a_first_argument_without_equals_names_the_recipe(own, argv, recipe_arg):
    folders, args = cli.options(argv, "train")
    assert folders == [str(own)] and args[0] == recipe_arg and args[1:] == argv[1:]


def test_a_recipe_file_anywhere_is_read_as_a_recipe_of_that_name(own, tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_RECIPES_CACHE", str(tmp_path / "cache"))
    elsewhere = tmp_path / "elsewhere" / "tuned.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text("# @package _global_\ntrain:\n  beta: 0.37\n")
    folders, args = cli.options([str(elsewhere), "--config-dir", str(tmp_path), "train.seed=3"], "train")
    assert args == ["recipes=tuned", "train.seed=3"] and folders[1:] == [str(tmp_path)]
    monkeypatch.setenv("DPO_RECIPES_CONFIG", os.pathsep.join(folders))
    cfg, recipe = config.compose(args)
    assert (recipe, cfg.train.beta, cfg.train.seed) == ("tuned", 0.37, 3)
    elsewhere.write_text("# @package _global_\ntrain:\n  beta: 0.5\n")  # linked, not copied
    assert config.compose(args)[0].train.beta == 0.5


@pytest.mark.parametrize(
    "argv, says",
    [
        (["train", "missing.yaml"], "recipe file 'missing.yaml' not found"),
        (["validate", "--config-dir", "nowhere"], "--config-dir 'nowhere': no such folder"),
        (["trian"], "usage: dpo-recipes VERB"),
    ],
)
def test_what_the_command_cannot_run_is_named(own, argv, says, capsys):
    assert cli.main(argv) == 2
    assert says in capsys.readouterr().err


def test_each_verb_runs_the_module_make_runs():
    make = (ROOT / "Makefile").read_text()
    for verb, (module, _) in cli.VERBS.items():
        assert f"-m {module}" in make, verb
    assert f"-m {cli.LAUNCH}" in make


@pytest.mark.e2e
def test_the_wheel_runs_recipes_from_an_empty_folder_without_the_clone(tmp_path):
    """The wheel in a fresh environment that sees this one's packages (torch, TRL) but not the clone."""
    source = tmp_path / "source"  # a build/ left in the clone would leak stale files into the wheel
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*LOCAL))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(tmp_path / "wheel")],
        check=True,
    )
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "outer.pth").write_text("\n".join(ours) + "\n")  # after its own site-packages
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel], check=True
    )
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DPO_RECIPES_CONFIG")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"

    def command(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(["dpo-recipes", *args], cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    where = subprocess.run(
        [python, "-c", "import dpo_recipes; print(dpo_recipes.ROOT)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(site)  # the installed package, its folders inside it
    short = [
        "train.max_steps=2",
        "train.eval_steps=2",
        "dataset.max_samples=16",
        "dataset.max_eval_samples=8",
    ]
    command("train", *short, "run.name=default")
    assert (
        json.loads((work / "outputs/tiny_lora_dpo/default/dpo_metrics/summary.json").read_text())["status"]
        == "finished"
    )

    command("init")
    rows = (ROOT / "data/toy/train.jsonl").read_text().splitlines()[:24]
    (work / "mine.jsonl").write_text("\n".join(rows) + "\n")
    (work / "conf/dataset/my_data.yaml").write_text(
        f"path: {work / 'mine.jsonl'}\nformat: trl\neval_size: 8\n"
    )
    shutil.move(work / "recipes/my_recipe.yaml", work / "my_recipe.yaml")
    command("train", "./my_recipe.yaml", "train.max_steps=2", "train.eval_steps=2", "run.name=mine")
    summary = json.loads((work / "outputs/my_recipe/mine/dpo_metrics/summary.json").read_text())
    assert summary["status"] == "finished" and summary["config"]["dataset"]["path"] == str(
        work / "mine.jsonl"
    )

    checked = command("validate", "recipes=qwen7b_lora_dpo")
    assert "no weights loaded" in checked.stdout
    (work / "alpaca.json").write_text(
        json.dumps([{"instruction": "Say hi.", "input": "", "chosen": "Hi!", "rejected": "No."}])
    )
    command("prep", "alpaca", "alpaca.json", "prefs.jsonl")
    assert json.loads((work / "prefs.jsonl").read_text())["chosen"][0]["content"] == "Hi!"
