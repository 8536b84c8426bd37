"""Benchmarks: where conditions come from and how samples are scored. One file + one YAML each."""
