"""roberta_fast benchmark harness (the repository's benchmarks/, installed as roberta_fast.benchmarks):
kernel and encoder benchmarks, the per-layer launch/byte analysis, and the report (JSON, markdown, PNG
plots). The cases, shape grids, accuracy rule and timers are roberta_fast.testing's.

Entry points (all reach roberta_fast.benchmarks.run.run):
    roberta-fast bench [--quick] [--out DIR] [--only NAME]
    python -m roberta_fast.benchmarks.run [same options]
    pytest benchmarks/ --benchmark-only          (from a checkout)
    benchmarks/gpu_suite.sh OUTDIR               (install, build, GPU tests, quick benchmarks)
"""
