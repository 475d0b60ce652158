"""Pieces for end-to-end tests of the monitoring side, to plug into the lab-based e2e test.

- `samples`: the real planner and flow state filled with simulated probe results (`SampleLoop`,
  `shop_snapshot`, `large_snapshot`), for web, metrics and bench tests without a lab.
- `processes`: free loopback ports, child processes stopped by pid, skips naming the package.
- `monitoring`: real Prometheus and Alertmanager (Debian packages) on free 127.0.0.1 ports with
  temporary configs, a webhook receiver, and the project's rules with `for:` shortened.
- `dashboards`: every Grafana panel query with its variables substituted, to run against them.
"""
