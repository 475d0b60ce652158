"""The lab: a Kubernetes-like cluster in Linux network namespaces on one host (`flowproof lab`).

Nodes and pods are network namespaces joined by veths, bridges and a routed fabric; each pod
runs the project's own small server in a kubelet-style pod cgroup; NetworkPolicies are compiled
into nftables inside every pod namespace. It must never send a packet outside the namespaces it
created: every range it uses is blackholed in the host namespace first (see docs/lab.md).
"""
