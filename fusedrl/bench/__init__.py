"""Benchmarks and the profiler, installed with the package: `fusedrl bench` / `python -m fusedrl.bench.run_all`."""
