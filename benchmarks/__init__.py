"""mova-rt's benchmark suite (`mova-rt bench`), installed as `mova_rt.benchmarks`.

Every performance claim of the project comes from here: step times of named runtime
configurations side by side, per-op microbenchmarks, and the ceilings measured in the same run.
"""
