"""Share: the prompt computed once per pair (`train.share_prompt=true`, alone and with padding-free
batches) against TRL as shipped and the CPU head alone, on the tiny Llama's cases of step.py (its
children, counts and table): real-length rows at micro-batch 1 and 4, and the default recipe."""

from benchmarks import step

CASES = {case: overrides for case, overrides in step.CASES.items() if "Llama" in case}
WAYS = ("trl", "ours", "shared", "both")
table = step.table


def run(repeats: int = step.REPEATS) -> dict:
    return step.run(repeats, CASES, WAYS)
