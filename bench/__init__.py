"""vl-backdoor-bench core: registries, run specs, pipeline, metrics, records, tables, CLI."""
__version__ = "0.1.0"
