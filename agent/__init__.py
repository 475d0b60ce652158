"""The flowproof node agent: one per node, probes from inside pod network namespaces.

Holds one gRPC stream to the collector (streaming), resolves pods to their namespaces from /proc
(resolving), makes sockets inside them (netns), probes (probing) and opens responders
(responders). `agent.runtime.main(argv)` builds and runs it; it never exposes an endpoint.
"""
