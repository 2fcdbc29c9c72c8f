"""Reproducible throughput benchmarks for hishrst (see ``benchmarks/README.md``).

Each script is runnable as ``python -m benchmarks.<name>`` or ``python benchmarks/<name>.py``, prints a
table and writes one JSON object per measurement to ``benchmarks/results/<name>.jsonl``.
"""
