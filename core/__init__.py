"""The floor every method imports: the one error type, the registries, parameter coercion.

Layers run one way: ``core`` <- tasks <- attacks <- models <- defenses <- ``bench`` (pipeline,
evaluation, records, tables, CLI). Nothing under ``core`` imports a method package or ``bench``.
"""
