"""Will it fit: the shape of a run (shapes.py), a step traced on fake tensors (trace.py), the estimate per
engine (estimates.py), the pre-flight verdict and its fixes (preflight.py), the measured peak
(measuring.py) and the docs' table (cards.py)."""
