"""What the README, the docs and the config comments claim matches the software: every command, option,
path and link they name exists, measured numbers are quoted from BENCHMARKS.md only, the toy data is
described as it is, and the README stays a five-minute read."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from dpo_recipes import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GROUPS = {p.name for p in (ROOT / "conf").iterdir() if p.is_dir()}
TARGETS = set(re.findall(r"(?m)^([a-z][\w-]*):", (ROOT / "Makefile").read_text()))
VARIABLES = {"RECIPE": "recipes", "HARDWARE": "conf/hardware", "SWEEP": "conf/sweep"}
# A measured number: a duration, a speed-up ratio, a throughput
MEASURED = re.compile(
    r"\b(about|took|takes|in) \d[\d.,]* ?(s|ms|min|minutes|seconds)\b"
    r"|\b\d+(\.\d+)?x (TRL|faster|slower|a step|the wall)|\d prompts/s"
)
MINE = "my_"  # the user's own files in the examples: my_recipe, my_data


def code(page: Path) -> str:
    """The page's code: fenced blocks and inline spans."""
    text = page.read_text()
    return "\n".join(re.findall(r"```.*?\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_option_and_path_a_page_names_exists(page):
    text, missing = code(page), []
    for target in re.findall(r"\bmake ([a-z][\w-]*)", text):
        missing += [f"make {target}"] * (target not in TARGETS)
    for variable, where in VARIABLES.items():
        for name in re.findall(rf"\b{variable}=([a-z]\w*)\b", text):
            missing += [f"{variable}={name}"] * (not (ROOT / where / f"{name}.yaml").exists())
    text = re.sub(rf"[\w/.]*\b{MINE}[\w.]*", "", text)
    for group, name in re.findall(r"(?<![\w.+/])\+?(\w+)=([a-z][\w]*)\b(?![.=/])", text):
        if group in GROUPS:
            missing += [f"{group}={name}"] * (not (ROOT / "conf" / group / f"{name}.yaml").exists())
    for path in re.findall(
        r"(?<![\w/~.-])((?:dpo_recipes|data_prep|tests|benchmarks|conf|recipes|accelerate)/[\w/.-]*\w)", text
    ):
        missing += [path] * (not (ROOT / path).exists() and "<" not in path)
    for module in re.findall(r"python -m ([\w.]+)", text):
        file = ROOT / module.replace(".", "/")
        missing += [f"python -m {module}"] * (
            not (file.with_suffix(".py").exists() or (file / "__main__.py").exists())
        )
    for link in re.findall(r"\]\(([^)#]+)", page.read_text()):
        missing += [link] * (not link.startswith("http") and not (page.parent / link).exists())
    assert not missing


def test_measured_numbers_are_quoted_from_benchmarks_md_only():
    comments = [
        line
        for path in [*(ROOT / "recipes").glob("*.yaml"), *(ROOT / "conf").rglob("*.yaml")]
        for line in path.read_text().splitlines()
        if line.lstrip().startswith("#")
    ]
    quoted = [
        m.group(0) for text in [*(p.read_text() for p in PAGES), *comments] for m in MEASURED.finditer(text)
    ]
    assert not quoted
    assert all(
        "BENCHMARKS.md" in p.read_text() for p in [ROOT / "README.md", ROOT / "docs" / "performance.md"]
    )


def test_the_readme_is_a_five_minute_read_pointing_to_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert all(f"(docs/{page.name})" in readme for page in (ROOT / "docs").glob("*.md"))


def test_the_toy_option_describes_the_toy_data():
    header = (ROOT / "conf" / "dataset" / "toy.yaml").read_text().split("path:")[0]
    assert "cheerful" in header and "gloomy" in header
    for line in (ROOT / "data" / "toy" / "train.jsonl").read_text().splitlines():
        asked = json.loads(line)["prompt"][-1]["content"].lower()
        assert "cheerful" in asked or "gloomy" in asked, asked


def test_make_help_lists_every_target():
    """The README says `make help` lists every target: each one the Makefile declares phony."""
    makefile = (ROOT / "Makefile").read_text()
    declared = set(re.search(r"^\.PHONY: (.+)$", makefile, re.M).group(1).split())
    shown = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert {line.split()[0] for line in shown.stdout.splitlines()} == declared
