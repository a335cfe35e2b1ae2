"""The PromQL of the operator's kit (deploy/), as a real Prometheus takes it.

dashboard_queries(path) gives every query of a Grafana dashboard: each
panel target's `expr` and each query variable's series (the selector of
Grafana's label_values(SELECTOR, LABEL)), with Grafana's variables
replaced.  rule_expressions(path) gives every `expr` of a Prometheus rule
file.  Both are plain functions on files, for the host test
(tests/test_deploy.py) and the lab's, which runs them against a
Prometheus that scrapes real exits."""

import json
import re

import yaml

# Grafana's own variables, as durations a query can take.  $__rate_interval
# is at least four scrape intervals in Grafana: 1m holds that for
# scrapes up to every 15 s.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s",
                    "__range": "1h"}
# What a dashboard variable becomes: every value.  The dashboard uses each
# one with =~, as Grafana's "All" does.
ALL = ".*"
# $name, ${name}, ${name:format} and the old [[name]].
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
LABEL_VALUES = re.compile(r"label_values\((.*),\s*\w+\)\s*$", re.S)


class KitError(Exception):
    """A file of the kit that cannot be read as a dashboard or rules."""


def substitute(expr, names):
    """expr with Grafana's variables replaced; one not defined by the
    dashboard (names) or Grafana is an error, not a query."""
    def value(match):
        name = next(group for group in match.groups() if group)
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        if name in names:
            return ALL
        raise KitError("undefined variable $%s in %r" % (name, expr))
    return VARIABLE.sub(value, expr)


def variable_query(variable):
    """The PromQL of a query variable: label_values(SELECTOR, LABEL) asks
    for SELECTOR's series.  None for other kinds (a data source)."""
    if variable.get("type") != "query":
        return None
    query = variable["query"]
    if isinstance(query, dict):
        query = query["query"]
    match = LABEL_VALUES.match(query)
    if not match:
        raise KitError("variable %s: not label_values(SELECTOR, LABEL): %r"
                       % (variable["name"], query))
    return match.group(1)


def panels(dashboard):
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(path):
    """Every PromQL query of the Grafana dashboard at `path`, in order:
    the variables', then the panels'."""
    with open(path) as f:
        dashboard = json.load(f)
    variables = dashboard.get("templating", {}).get("list", [])
    names = {v["name"] for v in variables}
    queries = [variable_query(v) for v in variables]
    queries = [q for q in queries if q is not None]
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if not target.get("expr"):
                raise KitError("panel %r: a target without expr"
                               % panel.get("title"))
            queries.append(target["expr"])
    return [substitute(q, names) for q in queries]


def rule_expressions(path):
    """Every rule's expr in the Prometheus rule file at `path`, in order."""
    with open(path) as f:
        rules = yaml.safe_load(f)
    return [rule["expr"].strip() for group in rules["groups"]
            for rule in group["rules"]]
