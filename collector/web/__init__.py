"""The collector's HTTP face: the web view, the JSON API, /metrics, health and the verify route."""
