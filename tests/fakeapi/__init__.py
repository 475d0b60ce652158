"""A fake Kubernetes API server for the faults the real one cannot be made to show on demand."""

from .server import RESOURCES, FakeApiServer, RequestRecord, ResourceType, merge_patch, resource_of

__all__ = [
    "RESOURCES",
    "FakeApiServer",
    "RequestRecord",
    "ResourceType",
    "merge_patch",
    "resource_of",
]
