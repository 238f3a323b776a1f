"""Helpers shared by the test suites: real processes, sockets and paths."""
