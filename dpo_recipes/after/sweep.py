"""The sweep report: one table, one plot and the best job for a Hydra multirun.

Written by a Hydra callback when the multirun ends, or again for an existing sweep dir (e.g. after
its jobs ran on a cluster):

    python -m dpo_recipes.after.sweep multirun/tiny_lora_dpo/2026-11-20_10-00-00 [--metric eval_loss --lower]

For a dir of on-policy rounds (make iterate RUN=<name> ARGS=... into outputs/<recipe>/<name>), the same
command on outputs/<recipe> compares them: each one's last round judged against its start.
"""

import argparse
import difflib
import json
import math
import sys
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

from data_prep.io import atomic_path, write_text
from dpo_recipes.rundir import paths
from dpo_recipes.training.metrics import BEST, to_csv

# What a sweep's jobs are ranked by where sweep_report.metric (--metric) names nothing: (metric, higher is
# better) for DPO, ORPO and CPO/SimPO, which score pairs; KTO, which rates each answer alone; and SFT
PAIRED = ("eval_rewards/accuracies", True)
TASK_METRIC = {"kto": ("eval_rewards/margins", True), "sft": ("eval_loss", False)}
ROUNDS = paths.ROUNDS[0]  # make iterate's report across rounds (dpo_recipes/after/rounds.py)


def _overrides(job_dir: Path) -> dict:
    """The job's own overrides (`train.beta=0.1` -> beta: 0.1), Hydra's own left out."""
    path = job_dir / paths.RECORD / paths.OVERRIDES
    return _keys(yaml.safe_load(path.read_text()) if path.exists() else [])


def _keys(items: list[str]) -> dict:
    pairs = [item.lstrip("+~").split("=", 1) for item in items if "=" in item]
    pairs = [(k, v) for k, v in pairs if k != "sweep" and not k.startswith("hydra")]
    short = [k.rsplit(".", 1)[-1] for k, _ in pairs]
    return {
        (s if short.count(s) == 1 else k): yaml.safe_load(v) for (k, v), s in zip(pairs, short, strict=True)
    }


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The dirs Hydra recorded a job's launch in."""
    return [d for d in sweep_dir.iterdir() if (d / paths.RECORD).is_dir()] if sweep_dir.is_dir() else []


def job(job_dir: Path, metrics: tuple[str, ...] = ()) -> dict:
    """One row: overrides, status, final and best values of the usual metrics and of `metrics`, runtime."""
    row = {"job": int(job_dir.name.split("_", 1)[0]), "dir": str(job_dir), "overrides": _overrides(job_dir)}
    summary_path = paths.summary_file(job_dir)
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        tokenize = (summary.get("tokenize") or {}).get("train") or {}  # None: tokenized by TRL's own path
        status = summary.get("status")
        error = "" if status == "finished" else f"{status} at step {summary.get('steps')}: re-run the sweep"
        row.update(status="ok" if status == "finished" else status, error=error)
        row.update(runtime_s=summary.get("runtime_s"), tokenize_s=tokenize.get("seconds"))
        row["peak_rss_mb"] = summary.get("peak_rss_mb")
        for metric in dict.fromkeys([*BEST, *metrics]):
            row[f"final_{metric}"] = summary["final"].get(metric)
            row[f"best_{metric}"] = summary["best"].get(metric, {}).get("value")
    elif (job_dir / paths.FAILED).exists():
        row.update(status="failed", error=json.loads((job_dir / paths.FAILED).read_text())["error"])
    else:
        row.update(status="missing", error="no summary.json: the job did not finish")
    return row


def pick_best(rows: list[dict], metric: str, higher: bool, tie_break: str = "eval_loss") -> dict | None:
    """The finished job with the best final `metric`; ties go to the lowest final `tie_break`."""

    def usable(value) -> bool:
        return isinstance(value, int | float) and math.isfinite(value)

    candidates = [r for r in rows if r["status"] == "ok" and usable(r.get(f"final_{metric}"))]
    if not candidates:
        return None

    def key(row):
        value, tie = row[f"final_{metric}"], row.get(f"final_{tie_break}")
        return (-value if higher else value, tie if usable(tie) else math.inf)

    return min(candidates, key=key)


def tied(rows: list[dict], best: dict | None, metric: str) -> list[int]:
    """The other finished jobs whose final `metric` equals the best job's: the tie-break chose among them."""
    if best is None:
        return []
    value = best[f"final_{metric}"]
    return [
        r["job"] for r in rows if r is not best and r["status"] == "ok" and r.get(f"final_{metric}") == value
    ]


def _plot(sweep_dir: Path, rows: list[dict], metric: str, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = _grid(rows, metric)
    fig, axes = plt.subplots(1, 2 if grid else 1, figsize=(14 if grid else 8, 5.5), constrained_layout=True)
    ax = axes[0] if grid else axes
    eval_metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    for row in rows:
        history = paths.metrics_dir(row["dir"]) / paths.HISTORY
        if row["status"] != "ok" or not history.exists():
            continue
        points = [(e["step"], e[eval_metric]) for e in json.loads(history.read_text()) if eval_metric in e]
        if points:
            xs, ys = zip(*points, strict=True)
            label = ", ".join(f"{k}={row['overrides'].get(k)}" for k in _varying(rows)) or f"job {row['job']}"
            ax.plot(xs, ys, "o-", markersize=3, label=label)
    ax.set(title=f"{eval_metric} per job", xlabel="step", ylabel=eval_metric)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    if grid:
        (x_key, xs), (y_key, ys), values, marks = grid
        image = axes[1].imshow(values, cmap="viridis", origin="lower", aspect="auto")
        axes[1].set(xticks=range(len(xs)), xticklabels=xs, yticks=range(len(ys)), yticklabels=ys)
        axes[1].set(xlabel=x_key, ylabel=y_key, title=f"final {metric}")
        for i in range(len(ys)):
            for j in range(len(xs)):
                if (i, j) in marks:
                    axes[1].text(j, i, marks[i, j], ha="center", va="center", color="red", fontsize=8)
                elif not math.isnan(values[i][j]):
                    colour = label_colour(image.cmap(image.norm(values[i][j])))
                    axes[1].text(j, i, f"{values[i][j]:.3g}", ha="center", va="center", color=colour)
        fig.colorbar(image, ax=axes[1])
    fig.suptitle(sweep_dir.name)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def contrast(rgba, text: str) -> float:
    """WCAG contrast ratio of black or white text on a cell's colour."""
    red, green, blue = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3])
    cell = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return (cell + 0.05) / 0.05 if text == "black" else 1.05 / (cell + 0.05)


def label_colour(rgba) -> str:
    """Black or white, whichever reads better on the cell."""
    return max(("black", "white"), key=lambda text: contrast(rgba, text))


def _varying(rows: list[dict]) -> list[str]:
    keys = {k: None for r in rows for k in r["overrides"]}
    return [k for k in keys if len({json.dumps(r["overrides"].get(k)) for r in rows}) > 1]


def _grid(rows: list[dict], metric: str):
    """(x axis, y axis, values) when the sweep varies exactly beta and learning_rate; else None."""
    if sorted(_varying(rows)) != ["beta", "learning_rate"]:
        return None
    points = [(r["overrides"]["beta"], r["overrides"]["learning_rate"], r) for r in rows]
    points = [p for p in points if all(isinstance(v, int | float) for v in p[:2])]
    xs, ys = sorted({p[0] for p in points}), sorted({p[1] for p in points})
    if not points:
        return None
    values = [[math.nan] * len(xs) for _ in ys]
    marks = {}  # a cell whose job did not finish: its status, never its last value
    for beta, lr, row in points:
        value, at = row.get(f"final_{metric}"), (ys.index(lr), xs.index(beta))
        if row["status"] == "ok" and isinstance(value, int | float):
            values[at[0]][at[1]] = value
        else:
            marks[at] = row["status"]
    return ("beta", xs), ("learning_rate", ys), values, marks


def task_metric(sweep_dir: Path) -> tuple[str, bool]:
    """The metric the jobs' task ranks by (and whether higher is better), where all ran one task."""
    summaries = [paths.summary_file(d) for d in job_dirs(sweep_dir)]
    tasks = {json.loads(p.read_text()).get("task", "dpo") for p in summaries if p.exists()}
    return TASK_METRIC.get(tasks.pop(), PAIRED) if len(tasks) == 1 else PAIRED


def write_report(
    sweep_dir: Path,
    metric: str | None = None,
    higher: bool = True,
    tie_break: str = "eval_loss",
) -> dict:
    """Write sweep_summary.csv, sweep_summary.json and sweep_curves.png into `sweep_dir`; ValueError
    when no job logged `metric` (None: the jobs' task's, task_metric) or `tie_break`."""
    sweep_dir = Path(sweep_dir)
    if metric is None:
        metric, higher = task_metric(sweep_dir)
    if problem := unlogged(sweep_dir, (metric, tie_break)):
        raise ValueError(problem)
    rows = sorted((job(d, (metric, tie_break)) for d in job_dirs(sweep_dir)), key=lambda row: row["job"])
    best = pick_best(rows, metric, higher, tie_break)
    ties = tied(rows, best, metric)
    report = {
        "sweep_dir": str(sweep_dir),
        "metric": metric,
        "higher_is_better": higher,
        "tie_break": tie_break,
        "jobs": rows,
        "best": best,
        "tied_with": ties,
    }
    write_text(sweep_dir / "sweep_summary.json", json.dumps(report, indent=2, default=str))
    flat = [
        {"job": r["job"], **r["overrides"], **{k: v for k, v in r.items() if k not in ("job", "overrides")}}
        for r in rows
    ]
    write_text(sweep_dir / "sweep_summary.csv", to_csv(flat, first=["job"]))
    _plot(sweep_dir, rows, metric, sweep_dir / "sweep_curves.png")
    failed = [r for r in rows if r["status"] != "ok"]
    chosen = (
        f"best: job {best['job']} ({metric} = {best[f'final_{metric}']:.4g}) in {best['dir']}"
        if best
        else "best: none"
    )
    if ties:
        named = ", ".join(map(str, ties))
        chosen += f" (tied on {metric} with job {named}; picked by the lowest final {tie_break}"
        chosen += f" = {best.get(f'final_{tie_break}')})"
    print(
        f"sweep report: {len(rows) - len(failed)} of {len(rows)} jobs ok; {chosen}; {sweep_dir / 'sweep_summary.csv'}"
    )
    return report


def unlogged(sweep_dir: Path, names) -> str | None:
    """Why `names` cannot rank the jobs: a name no finished job logged, with the names they did log."""
    summaries = [paths.summary_file(d) for d in job_dirs(sweep_dir)]
    logged = {key for path in summaries if path.exists() for key in json.loads(path.read_text())["final"]}
    for name in names:
        if logged and name not in logged:
            close = difflib.get_close_matches(name, sorted(logged), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            return f"no job logged {name!r}; {hint}they logged {', '.join(sorted(logged))}"
    return None


def rounds_dirs(parent: Path) -> list[Path]:
    """The dirs `make iterate` wrote its report across rounds in."""
    return sorted(d for d in parent.iterdir() if (d / ROUNDS).is_file()) if parent.is_dir() else []


def rounds_row(rounds_dir: Path) -> dict:
    """One rounds dir: its keys beside the recipe, its rounds, and its last round against the start."""
    report = json.loads((rounds_dir / ROUNDS).read_text())
    keys = _keys([o for o in report["overrides"] if not o.startswith("recipes=")])
    processes = {"nproc": report["nproc"]} if report.get("nproc", 1) > 1 else {}  # make iterate NPROC=
    row = {"dir": str(rounds_dir), "overrides": {**keys, **processes}}
    row["rounds"] = len(report["rounds"])
    last = report["rounds"][-1]["vs_start"] if report["rounds"] else {}
    row["win_rate_vs_start"] = last.get("win_rate")
    row["lower"], row["upper"] = last.get("interval", (None, None))
    row["length_ratio_vs_start"] = last.get("length_ratio")
    row["rates_vs_start"] = [r["vs_start"]["win_rate"] for r in report["rounds"]]
    return row


def write_rounds_report(parent: Path) -> dict:
    """sweep_summary.json, .csv and sweep_curves.png across the rounds dirs in `parent`; the best is the
    one whose last round's interval against its start lies highest (its lower bound, then its rate)."""
    rows = [rounds_row(d) for d in rounds_dirs(parent)]
    done = [r for r in rows if r["rounds"]]
    best = max(done, key=lambda r: (r["lower"], r["win_rate_vs_start"]), default=None)
    report = {"rounds_dirs": str(parent), "ranked_by": "last round vs start: lower bound, then win rate",
              "runs": rows, "best": best}  # fmt: skip
    write_text(parent / "sweep_summary.json", json.dumps(report, indent=2))
    flat = [{"dir": r["dir"], **r["overrides"], **{k: v for k, v in r.items() if k not in ("dir", "overrides")}}
            for r in rows]  # fmt: skip
    write_text(parent / "sweep_summary.csv", to_csv(flat, first=("dir",)))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for row in done:
        label = ", ".join(f"{k}={row['overrides'].get(k)}" for k in _varying(rows)) or Path(row["dir"]).name
        ax.plot(range(1, row["rounds"] + 1), row["rates_vs_start"], "o-", label=label)
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set(title=f"rounds in {parent}", xlabel="round", ylabel="judged win rate vs start", ylim=(0, 1))
    if ax.lines:
        ax.legend(fontsize=8)
    with atomic_path(parent / "sweep_curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    chosen = (f"best: {best['dir']} (round {best['rounds']} vs start {best['win_rate_vs_start']:.2f}, 95% CI "
              f"{best['lower']:.2f}-{best['upper']:.2f})" if best else "best: none (no round finished)")  # fmt: skip
    print(
        f"rounds report: {len(done)} of {len(rows)} dirs with a finished round; {chosen}; {parent / 'sweep_summary.csv'}"
    )
    return report


class SweepReport(Callback):
    """Hydra callback: write the sweep report when a multirun ends; exit 1 if any job failed or the
    report's metric was never logged."""

    def on_multirun_end(self, config, **kwargs) -> None:
        options = config.sweep_report
        try:
            report = write_report(
                Path(config.hydra.sweep.dir), options.metric, options.higher_is_better, options.tie_break
            )
        except ValueError as err:
            print(f"error: sweep_report: {err}", file=sys.stderr)
            sys.exit(1)
        except Exception as err:  # Hydra would only warn of it: the sweep must not end as if reported
            print(f"error: sweep_report: {type(err).__name__}: {err}", file=sys.stderr)
            sys.exit(1)
        failed = [r["job"] for r in report["jobs"] if r["status"] != "ok"]
        if failed:
            print(f"error: jobs {failed} failed; see sweep_summary.csv", file=sys.stderr)
            sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dpo_recipes.after.sweep", description="Rebuild a sweep's report."
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument(
        "--metric",
        help="default: the jobs' task's (eval_rewards/accuracies; KTO eval_rewards/margins; SFT eval_loss)",
    )
    parser.add_argument("--lower", action="store_true", help="lower values of --metric are better")
    parser.add_argument("--tie-break", default="eval_loss", help="lowest value wins a tie")
    args = parser.parse_args(argv)
    jobs = job_dirs(args.sweep_dir)
    if not jobs and rounds_dirs(args.sweep_dir):
        write_rounds_report(args.sweep_dir)
        return 0
    if not jobs:
        print(
            f"error: {args.sweep_dir} is not a sweep dir (no job dirs with .hydra/ in it) nor a dir of rounds "
            f"dirs (with {ROUNDS} in them)",
            file=sys.stderr,
        )
        return 2
    try:
        write_report(args.sweep_dir, args.metric, not args.lower, args.tie_break)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
