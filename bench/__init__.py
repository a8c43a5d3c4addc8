"""SparseQA benchmarks (pytest-benchmark suites and the report generator)."""
