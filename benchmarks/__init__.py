"""ddnlib benchmarks: every case prints ratios against a baseline measured in the same run.

Run ``python -m benchmarks --help``; results are described in ``docs/benchmarks.md``.
"""
