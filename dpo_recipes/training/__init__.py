"""What runs while training: the data (data.py) and tokenizer with its chat template (chat.py), the
faster tokenization (tokenize.py), the Trainer and its TRL seams (trainer.py) with the packed layouts
(segments.py) and the CPU head (cpu_head.py), and the callbacks that record (metrics.py, updates.py),
judge a run's health (health.py) and stop it cleanly (stopping.py)."""
