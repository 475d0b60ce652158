"""JSON Schemas shipped with the collector (package data); `flowexpectations.schema.json` is one."""
