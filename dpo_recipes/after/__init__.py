"""After training: a trained run read back (trained.py), samples side by side (samples.py), a judge
(judge.py) and its win rates (evaluate.py), judging during training (judging.py), export (export.py) and
a sweep's report (sweep.py)."""
