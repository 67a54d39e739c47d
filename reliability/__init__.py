"""Hubline's reliability and security suite (issue 10): real processes, real HTTP, a report.

`reliability/run` provisions a throwaway PostgreSQL server and runs `python -m reliability`.
"""
