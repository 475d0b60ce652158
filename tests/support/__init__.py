"""Helpers shared by test suites: small fakes of things the real ones cannot be made to do on demand."""
