"""A fake Kubernetes API server for tests: real list/watch wire protocol, test controls."""

from .server import RESOURCES, FakeApiServer, RequestRecord, ResourceType, merge_patch, resource_of

__all__ = [
    "RESOURCES",
    "FakeApiServer",
    "RequestRecord",
    "ResourceType",
    "merge_patch",
    "resource_of",
]
