"""roberta_fast benchmark harness: kernel and encoder benchmarks, the per-layer launch/byte analysis,
and the report (JSON, markdown, PNG plots).

Entry points (all reach benchmarks.run.run):
    roberta-fast bench [--quick] [--out DIR] [--only NAME]
    python -m benchmarks.run [same options]
    pytest benchmarks/ --benchmark-only
    benchmarks/gpu_suite.sh OUTDIR          (install, build, GPU tests, quick benchmarks)
"""
