"""Backdoor attacks: one module per trigger, plus targets.py (what the backdoor makes the model say)."""
