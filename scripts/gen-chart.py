#!/usr/bin/env python3
"""Copies what the Helm chart shares with deploy/ into it (a chart cannot read outside itself).

The one source of each is in deploy/: the CRD (made by scripts/gen-crd.py), the alerting rules
(deploy/prometheus/rules.yaml), the Grafana dashboards (made by scripts/gen-dashboards.py) and the
probe pods' admission policy. charts/flowproof/ holds byte-for-byte copies; its templates read
them as data. Never edit the copies.

    scripts/gen-chart.py            copy them into charts/flowproof/
    scripts/gen-chart.py --check    exit 1 if a copy is stale (tests/integration/test_chart.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "flowproof"


def copies(root: Path = ROOT) -> dict[Path, Path]:
    """Each copy in the chart and its source in deploy/."""
    deploy, chart = root / "deploy", root / "charts" / "flowproof"
    found = {
        chart / "crds" / "flowexpectations.yaml": deploy / "crds" / "flowexpectations.yaml",
        chart / "files" / "rules.yaml": deploy / "prometheus" / "rules.yaml",
        chart / "files" / "admission-policy.yaml": (
            deploy / "overlays" / "probe-pods" / "admission-policy.yaml"
        ),
    }
    for board in sorted((deploy / "grafana" / "dashboards").glob("*.json")):
        found[chart / "files" / "dashboards" / board.name] = board
    return found


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a copy is stale")
    args = parser.parse_args(argv)
    wanted = copies(root)
    stale = []
    for target, source in wanted.items():
        data = source.read_bytes()
        if args.check:
            if not target.exists() or target.read_bytes() != data:
                stale.append(str(target.relative_to(root)))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    extra = sorted(
        str(p.relative_to(root))
        for p in (root / "charts" / "flowproof" / "files" / "dashboards").glob("*.json")
        if p not in wanted
    )
    for path in extra:
        if args.check:
            stale.append(f"{path} (no longer in deploy/grafana/dashboards)")
        else:
            (root / path).unlink()
    if stale:
        print(f"stale: {', '.join(stale)}: run `python3 scripts/gen-chart.py`", file=sys.stderr)
        return 1
    if not args.check:
        print(f"copied {len(wanted)} files into {CHART.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
