"""The preflight: what a run needs, checked before it starts (run.py), one function per stage (checks.py)."""
