"""The pure core of the collector: model, engine, planning, flow state, views and reports.

No I/O and no `kubernetes`, `grpc`, `aiohttp`, protobuf or `prometheus_client`, directly or
indirectly (an import-linter contract holds it so).
"""
