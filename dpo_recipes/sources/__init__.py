"""Where a run's models, tokenizers and files come from: the Hub, with one message when it cannot give
them (hub.py); the files the project ships (assets.py); the tiny offline models (tiny.py)."""
