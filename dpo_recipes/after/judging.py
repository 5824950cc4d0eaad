"""Judging while training (`judge.every`): at every N-th evaluation the policy answers a fixed set of
held-out prompts and the judge compares them with the reference's answers, logged as eval_judge/*. The
first process judges; under several processes the verdict is broadcast to the rest."""

from types import SimpleNamespace

from dpo_recipes.after import judge, samples
from dpo_recipes.after.evaluate import answers, judged, ready


class Judging:
    """judge.every while training: at each evaluation on a multiple of `every` steps, the policy's greedy
    answers to `prompts` (judge.selection: the last `judge.prompts` distinct eval prompts) judged against
    the reference's, as eval metrics.
    The reference's answers are made once, before the first step: by the separate reference model, or
    by the policy while it still is the reference (a new adapter is a no-op, a resumed run's checkpoint
    is not loaded yet)."""

    def __init__(self, spec, prompts: list):
        ready(spec.path, spec.revision)
        self.spec, self.prompts, self.judge, self.reference = spec, prompts, None, None
        self.options = SimpleNamespace(
            temperature=0.0, max_new_tokens=spec.max_new_tokens, batch_size=16, seed=0
        )

    def due(self, step: int) -> bool:
        return step % self.spec.every == 0

    def _answers(self, model, tokenizer, who: str) -> list[str]:
        training = model.training
        model.eval()
        try:
            decoding = samples.decoding_of(tokenizer, model, self.options) | {"use_cache": True}
            return answers(
                model, tokenizer, self.prompts, self.options, decoding, model.device, f"judge: {who}"
            )
        finally:
            model.train(training)

    def start(self, trainer) -> None:
        model = trainer.ref_model if trainer.ref_model is not None else trainer.model
        with apart(model.device):
            self.reference = self._answers(model, trainer.processing_class, "the reference's answers")

    def __call__(self, trainer) -> dict:
        """eval_judge/win_rate (ties half), its 95% interval, the length-controlled rate, the length ratio."""
        with apart(trainer.model.device):
            if self.judge is None:  # loaded once, kept beside the policy for the run's later evaluations
                self.judge = judge.load(self.spec.kind, self.spec.path, self.spec.revision)
            policy = self._answers(trainer.model, trainer.processing_class, "the policy's answers")
            c, _, _ = judged(self.judge, self.prompts, policy, self.reference, list(range(len(policy))))
        low, high = c["interval"]
        return {
            "eval_judge/win_rate": c["win_rate"], "eval_judge/win_rate_low": low, "eval_judge/win_rate_high": high,
            "eval_judge/lc_win_rate": c["lc_win_rate"], "eval_judge/length_ratio": c["length_ratio"],
        }  # fmt: skip


def apart(device):
    """Judging within training draws nothing from the random state training draws from (dropout, the
    data order): it is put back after."""
    import torch

    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
