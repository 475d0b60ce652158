"""Reading untrusted input: YAML with line marks, the field toolkit, dict to model converters,
expectations and manifest files. Never evaluates a policy and never talks to a cluster.
"""
