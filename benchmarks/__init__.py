"""Side-by-side benchmarks, run with `retroloop bench NAME` (each module: `bench_<name>.main`)."""
