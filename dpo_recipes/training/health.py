"""Health checks that explain a bad DPO run from its logged metrics: each flag says what is wrong and
what to try. Written into summary.json and printed at the end of a run."""

import math
import statistics

LN2 = math.log(2)


def _entries(history: list[dict], key: str) -> list[dict]:
    return [e for e in history if isinstance(e.get(key), int | float) and math.isfinite(e[key])]


def _series(history: list[dict], key: str) -> list[float]:
    return [e[key] for e in _entries(history, key)]


# A trend (likelihood displacement, over-fitting) means something only over enough of the run: at
# least TREND_LOGS logged values spanning TREND_STEPS optimizer steps. Short runs get no trend flag.
TREND_LOGS, TREND_STEPS = 8, 50


def _long_enough(history: list[dict], key: str) -> bool:
    steps = [e["step"] for e in history if isinstance(e.get(key), int | float) and "step" in e]
    return len(steps) >= TREND_LOGS and steps[-1] - steps[0] >= TREND_STEPS


def _thirds(values: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last third: a trend that one noisy step cannot fake."""
    n = max(1, len(values) // 3)
    return statistics.fmean(values[:n]), statistics.fmean(values[-n:])


def _stuck(h):
    loss, margins = _series(h, "loss"), _series(h, "rewards/margins")
    if len(loss) >= 3 and all(abs(x - LN2) < 0.01 for x in loss) and all(abs(m) < 1e-3 for m in margins):
        return (
            "loss stuck at ln 2 and margins at 0: the policy never moved away from the reference",
            "check that beta > 0, raise train.learning_rate, and that the reference is not updated with the policy",
        )


def _binary_accuracy(h):
    accuracy = _series(h, "rewards/accuracies")
    if len(accuracy) >= 3 and all(a in (0.0, 1.0) for a in accuracy):
        return (
            "rewards/accuracies is only ever 0 or 1: each logged value covers too few pairs to read",
            "log over more steps (train.logging_steps), use a larger batch, or read eval_rewards/accuracies on a larger eval set",
        )


def _displacement(h):
    chosen, margins = _series(h, "logps/chosen"), _series(h, "rewards/margins")
    if not (_long_enough(h, "logps/chosen") and _long_enough(h, "rewards/margins")):
        return None
    (c0, c1), (m0, m1) = _thirds(chosen), _thirds(margins)
    falling = sum(b < a for a, b in zip(chosen, chosen[1:], strict=False)) >= 0.6 * (len(chosen) - 1)
    if c1 < c0 - 1.0 and falling and m1 > m0:
        return (
            f"chosen log-probs fall steadily ({c0:.1f} -> {c1:.1f}) while margins grow over {len(chosen)} logs: "
            f"likelihood displacement, the model pushes both answers down (flagged from {TREND_LOGS} logs "
            f"across {TREND_STEPS} steps)",
            "add an NLL term on the chosen answers (loss=rpo) or lower train.learning_rate",
        )


def _overfitting(h):
    train, evaluation = _series(h, "rewards/accuracies"), _series(h, "eval_rewards/accuracies")
    if len(evaluation) < 3 or not _long_enough(h, "rewards/accuracies"):
        return None
    (t0, t1), peak, last = _thirds(train), max(evaluation), evaluation[-1]
    if t1 > t0 and last < peak - 0.05 and evaluation.index(peak) < len(evaluation) - 1:
        return (
            f"eval accuracy fell from {peak:.2f} to {last:.2f} while train accuracy rose: over-fitting "
            f"(flagged from 3 evals and {TREND_LOGS} train logs across {TREND_STEPS} steps)",
            "train fewer epochs or steps, lower train.learning_rate, raise beta, or add data",
        )


# A spike stands out from its neighbours: SPIKE times the median of the SPIKE_WINDOW logged norms on
# each side. A whole run's median would flag the first steps of a run whose norms fall as it converges.
SPIKE, SPIKE_WINDOW = 10, 3


def _grad_spikes(h):
    logged = [(e["step"], e["grad_norm"]) for e in _entries(h, "grad_norm") if "step" in e]
    if len(logged) < 5:
        return None
    norms, spikes = [norm for _, norm in logged], []
    for i, (step, norm) in enumerate(logged):
        local = statistics.median(norms[max(0, i - SPIKE_WINDOW) : i] + norms[i + 1 : i + 1 + SPIKE_WINDOW])
        if local > 0 and norm > SPIKE * local:
            spikes.append((step, norm, local))
    if spikes:
        step, value, local = spikes[0]
        return (
            f"grad-norm spikes: {len(spikes)} logged steps above {SPIKE}x the median of their neighbours "
            f"(first: {value:.3g} at step {step}, beside {local:.3g})",
            "lower train.learning_rate, add warmup (train.warmup_steps), or lower train.max_grad_norm",
        )


# precision.UpdateProbe's share of sampled updates that left the stored weight unchanged: above this,
# the weights barely train (bf16 weights without fp32 masters lose ~99% at DPO's learning rates).
LOST = 0.5


def _lost_updates(h):
    lost = _series(h, "updates/lost")
    if lost and statistics.fmean(lost) > LOST:
        return (
            f"{statistics.fmean(lost):.0%} of the sampled weight updates were lost to rounding (the stored "
            "weight did not change): the weights barely train",
            "keep fp32 master weights: train.bf16=true with model.dtype=float32 (or the default "
            "hardware.master_weights=true), hardware=zero3 or hardware=fsdp; or raise train.learning_rate",
        )


CHECKS = {
    "lost_updates": _lost_updates,
    "stuck_at_ln2": _stuck,
    "binary_accuracy": _binary_accuracy,
    "likelihood_displacement": _displacement,
    "overfitting": _overfitting,
    "grad_norm_spikes": _grad_spikes,
}


def check(log_history: list[dict]) -> list[dict]:
    """Flags raised by a run's log history: [{flag, problem, fix}], empty for a healthy run."""
    found = {name: rule(log_history) for name, rule in CHECKS.items()}
    return [{"flag": name, "problem": f[0], "fix": f[1]} for name, f in found.items() if f]
