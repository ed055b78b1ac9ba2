"""Helpers of ``benchmarks/finetune.py``: the tasks, the method registry, one measured run, the report."""
