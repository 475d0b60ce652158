"""flowproof: prove Kubernetes NetworkPolicies with real packets.

This package holds the command line (``flowproof``) and, under ``flowproof.v1``, the generated
agent–collector contract. The services live in the top-level ``collector`` and ``agent`` packages.
"""

__version__ = "0.1.0"
