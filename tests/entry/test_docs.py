"""What the README and the config comments claim matches the software: timings come from `make bench`,
the toy data is described as it is."""

import json
import re

from dpo_recipes import ROOT


def test_the_quoted_default_run_time_is_the_benchmarked_one():
    overhead = json.loads((ROOT / "benchmarks" / "results.json").read_text())["overhead"]
    measured = next(r["wall_s"] for r in overhead["results"] if r["what"].startswith("make train"))
    readme = (ROOT / "README.md").read_text()
    default_run = readme.split("The default recipe, `tiny_lora_dpo`")[1].split("\n\n")[0]
    header = (ROOT / "recipes" / "tiny_lora_dpo.yaml").read_text().split("defaults:")[0]
    for text in (default_run, header):
        (quoted,) = re.findall(r"about (\d+) s", text)
        assert abs(int(quoted) - measured) <= 0.15 * measured, (quoted, measured)
        assert "make bench" in text


def test_the_toy_option_describes_the_toy_data():
    header = (ROOT / "conf" / "dataset" / "toy.yaml").read_text().split("path:")[0]
    assert "cheerful" in header and "gloomy" in header
    for line in (ROOT / "data" / "toy" / "train.jsonl").read_text().splitlines():
        asked = json.loads(line)["prompt"][-1]["content"].lower()
        assert "cheerful" in asked or "gloomy" in asked, asked
