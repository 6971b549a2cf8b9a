"""Backdoor defenses: one module per defense (defenses/base.py says where each kind hooks in)."""
