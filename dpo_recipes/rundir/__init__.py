"""The run dir: its layout, named once (paths.py); what a launch does with it, a pure plan
(planning.py); and this launch's decision, carried out (launching.py)."""
