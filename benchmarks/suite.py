"""The test suite on a fresh clone, as CI runs it: `make setup`, then `make test-fast` (the default tier)
and `bash .ci/run` (lint and `make test`, every tier), each timed as a whole process. The clone has no
`../shared` beside it, as a user's has not.

    python -m benchmarks suite
"""

import re
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = {
    "make setup": ["make", "setup"],
    "make test-fast": ["make", "test-fast"],
    ".ci/run": ["bash", ".ci/run"],
}


def counts(output: str) -> str:
    """pytest's last line, e.g. `388 passed, 245 deselected`, without its timing."""
    found = re.findall(r"=+ (.*(?:passed|failed).*?)(?: in [\d.]+s.*)? =+", output)
    return found[-1] if found else ""


def run() -> dict:
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        for name, cmd in STEPS.items():
            start = time.perf_counter()
            done = subprocess.run(cmd, cwd=clone, capture_output=True, text=True)
            wall = time.perf_counter() - start
            failed = re.findall(r"^FAILED (\S+)", done.stdout, re.MULTILINE)  # named, to be read again
            rows.append(
                {"what": name, "wall_s": round(wall), "exit": done.returncode, "tests": counts(done.stdout)}
                | ({"failed": failed} if failed else {})
            )
            if done.returncode:
                break
    return {"commit": commit.stdout.strip(), "results": rows}


def table(result: dict) -> str:
    lines = ["| step | wall s | exit | tests |", "| --- | --- | --- | --- |"]
    lines += [f"| `{r['what']}` | {r['wall_s']} | {r['exit']} | {r['tests']} |" for r in result["results"]]
    lines += [
        f"\nfailed in `{r['what']}`: {', '.join(r['failed'])}" for r in result["results"] if r.get("failed")
    ]
    return "\n".join(lines) + f"\n\nA fresh clone of commit {result['commit']}, one step after the other."


if __name__ == "__main__":
    print(table(run()))
