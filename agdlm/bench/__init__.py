"""Benchmarks that print figures (`agdlm bench optim|data|dist`); never timed asserts."""
