#!/usr/bin/env python3
"""Every PromQL expression of the Grafana dashboard parses: each panel target
and each template variable's metric selector becomes a recording rule in a
temporary rules file (JSON is YAML), checked with `promtool check rules`.
Grafana's variables are replaced by values of the same syntactic kind first.
Which metrics the expressions name is checked against a real scrape by
tests/deploy.rs. Usage: check-promql.py deploy/grafana/sluice.json"""
import json
import re
import subprocess
import sys
import tempfile

GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${datasource}": "prometheus",
    "$job": ".*",
    "$instance": ".*",
}


def queries(node, out):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                out.append(v)
            elif k == "query" and isinstance(v, str) and node.get("type") == "query":
                # label_values(SELECTOR, label): the selector is PromQL.
                m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", v, re.S)
                out.append(m.group(1) if m else v)
            else:
                queries(v, out)
    elif isinstance(node, list):
        for v in node:
            queries(v, out)


def main(path):
    exprs = []
    queries(json.load(open(path)), exprs)
    if not exprs:
        sys.exit(f"{path}: no expressions found")
    rules = []
    for i, e in enumerate(exprs):
        for var, value in GRAFANA_VARS.items():
            e = e.replace(var, value)
        if "$" in e:
            sys.exit(f"{path}: unknown Grafana variable in: {e}")
        rules.append({"record": f"dashboard:expr_{i}", "expr": e})
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        f.flush()
        r = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout + r.stderr)
            sys.exit(f"{path}: an expression does not parse (rules above, numbered in file order)")
    print(f"{path}: {len(exprs)} PromQL expressions parse (promtool check rules)")


main(sys.argv[1])
