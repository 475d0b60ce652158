"""Benchmarks and their inputs: synthetic clusters (`bench.synthetic`) sized like real ones.

Nothing here runs at import time or touches a real cluster or the network.
"""
