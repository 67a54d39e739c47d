"""Hubline's benchmarks (issue 9): `benchmarks/run` runs them all and prints one table."""
