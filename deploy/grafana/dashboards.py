"""Grafana dashboards as code: this module generates `deploy/grafana/dashboards/*.json`.

    python -m deploy.grafana.dashboards            # rewrite the JSON files (they are committed)
    python -m deploy.grafana.dashboards --check    # type-check them against @grafana/schema with tsc

Two dashboards read the InfluxDB datasource `lineguard-influxdb` (InfluxQL) that
`provisioning/datasources/lineguard.yaml` provisions and `lineguard grafana push` creates:

- **lineguard · line overview**: defect rate per line, throughput, model latency, consumer lag,
  dead letters, and totals;
- **lineguard · defects**: defects by product, by position as a 3x3 heat grid (nine stat panels
  laid out as the frame's cells), by region size, the score distribution and score quantiles.

Every panel carries one raw InfluxQL query over the measurements written by `storage/stats.py`
(`defect_stats`, `defect_positions`, `defect_sizes`, `score_histogram`, `dead_letters`, `kafka_lag`),
and an `expect` entry (kept out of the JSON) saying which series the query returns; the tests run
every query against a real influxd and check it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lineguard.events import POSITIONS

HERE = Path(__file__).resolve().parent
DASHBOARD_DIR = HERE / "dashboards"
SCHEMA_CHECK_DIR = HERE / "schema-check"
DATASOURCE_UID = "lineguard-influxdb"
DATASOURCE = {"type": "influxdb", "uid": DATASOURCE_UID}
SCHEMA_VERSION = 41
FILTER = "\"line\" =~ /^$line$/ AND \"product\" =~ /^$product$/"


@dataclass
class Expect:
    """What a panel's query returns: series grouped by `tags`, with these value `columns`."""

    tags: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()


@dataclass
class PanelSpec:
    title: str
    type: str
    query: str
    grid: tuple[int, int, int, int]           # x, y, w, h
    expect: Expect
    description: str = ""
    unit: str | None = None
    alias: str | None = None
    result_format: str = "time_series"
    options: dict = field(default_factory=dict)
    custom: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    interval: str | None = None


# -- panel options, complete as @grafana/schema requires them ---------------------------------
def _legend(placement: str = "bottom") -> dict:
    return {"showLegend": True, "displayMode": "list", "placement": placement, "calcs": []}


TOOLTIP = {"mode": "multi", "sort": "desc"}


def timeseries_options() -> dict:
    return {"legend": _legend(), "tooltip": TOOLTIP}


def timeseries_custom(draw: str = "line") -> dict:
    return {"drawStyle": draw, "lineWidth": 1, "fillOpacity": 60 if draw == "bars" else 10,
            "showPoints": "never", "spanNulls": False, "axisPlacement": "auto"}


def stat_options(color_mode: str = "value", graph: str = "none") -> dict:
    return {"reduceOptions": {"calcs": ["sum"], "fields": "", "values": False}, "orientation": "auto",
            "textMode": "value", "colorMode": color_mode, "graphMode": graph, "justifyMode": "center",
            "showPercentChange": False, "percentChangeColorMode": "standard", "wideLayout": True}


def barchart_options(x_field: str) -> dict:
    return {"xField": x_field, "orientation": "auto", "barWidth": 0.8, "groupWidth": 0.7, "fullHighlight": False,
            "showValue": "auto", "stacking": "none", "xTickLabelRotation": 0, "xTickLabelMaxLength": 0,
            "legend": _legend(), "tooltip": {"mode": "single", "sort": "none"}}


HEAT_THRESHOLDS = {"mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "yellow", "value": 1},
                                                 {"color": "orange", "value": 5}, {"color": "red", "value": 20}]}


# -- the two dashboards -------------------------------------------------------------------------
def overview_panels() -> list[PanelSpec]:
    return [
        PanelSpec(
            "Defect rate per line", "timeseries",
            f"SELECT sum(\"defects\") / sum(\"frames\") AS \"defect_rate\" FROM \"defect_stats\" WHERE "
            f"\"window\" = '$window' AND {FILTER} AND $timeFilter GROUP BY time($__interval), \"line\" fill(none)",
            (0, 0, 12, 8), Expect(("line",), ("defect_rate",)), "Defective frames / frames, per line.",
            unit="percentunit", alias="$tag_line", options=timeseries_options(), custom=timeseries_custom(),
            interval="10s"),
        PanelSpec(
            "Throughput per line (frames/s)", "timeseries",
            f"SELECT sum(\"frames\") / 10 AS \"frames_per_s\" FROM \"defect_stats\" WHERE \"window\" = '10s' AND "
            f"{FILTER} AND $timeFilter GROUP BY time(10s), \"line\" fill(none)",
            (12, 0, 12, 8), Expect(("line",), ("frames_per_s",)), "Verdicts per second, from the 10 s windows.",
            unit="short", alias="$tag_line", options=timeseries_options(), custom=timeseries_custom()),
        PanelSpec(
            "Model latency", "timeseries",
            f"SELECT max(\"latency_p50_ms\") AS \"p50\", max(\"latency_p95_ms\") AS \"p95\", "
            f"max(\"latency_p99_ms\") AS \"p99\", max(\"total_latency_p95_ms\") AS \"end_to_end_p95\" "
            f"FROM \"defect_stats\" WHERE \"window\" = '$window' AND {FILTER} AND $timeFilter "
            f"GROUP BY time($__interval) fill(none)",
            (0, 8, 12, 8), Expect((), ("p50", "p95", "p99", "end_to_end_p95")),
            "Model time per frame (quantiles of each window, worst window per interval).", unit="ms",
            options=timeseries_options(), custom=timeseries_custom(), interval="10s"),
        PanelSpec(
            "Consumer lag", "timeseries",
            "SELECT last(\"lag\") AS \"lag\" FROM \"kafka_lag\" WHERE $timeFilter "
            "GROUP BY time($__interval), \"group\", \"topic\" fill(none)",
            (12, 8, 12, 8), Expect(("group", "topic"), ("lag",)),
            "Messages not yet committed, per consumer group and topic.", unit="short",
            alias="$tag_group $tag_topic", options=timeseries_options(), custom=timeseries_custom(), interval="10s"),
        PanelSpec(
            "Dead letters", "timeseries",
            "SELECT sum(\"count\") AS \"dead_letters\" FROM \"dead_letters\" WHERE $timeFilter "
            "GROUP BY time($__interval), \"service\", \"error_type\" fill(none)",
            (0, 16, 12, 8), Expect(("service", "error_type"), ("dead_letters",)),
            "Messages no service could handle, per service and error type.", unit="short",
            alias="$tag_service: $tag_error_type", options=timeseries_options(), custom=timeseries_custom("bars"),
            interval="10s"),
        PanelSpec(
            "Frames", "stat",
            f"SELECT sum(\"frames\") AS \"frames\" FROM \"defect_stats\" WHERE \"window\" = '1m' AND {FILTER} "
            f"AND $timeFilter",
            (12, 16, 4, 8), Expect((), ("frames",)), "Frames inspected in the time range.", unit="short",
            options=stat_options()),
        PanelSpec(
            "Defects", "stat",
            f"SELECT sum(\"defects\") AS \"defects\" FROM \"defect_stats\" WHERE \"window\" = '1m' AND {FILTER} "
            f"AND $timeFilter",
            (16, 16, 4, 8), Expect((), ("defects",)), "Defective frames in the time range.", unit="short",
            options=stat_options()),
        PanelSpec(
            "Defect rate", "stat",
            f"SELECT sum(\"defects\") / sum(\"frames\") AS \"defect_rate\" FROM \"defect_stats\" WHERE "
            f"\"window\" = '1m' AND {FILTER} AND $timeFilter",
            (20, 16, 4, 8), Expect((), ("defect_rate",)), "Defective frames / frames in the time range.",
            unit="percentunit", options=stat_options() | {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                                                           "values": False}}),
    ]


def defects_panels() -> list[PanelSpec]:
    panels = [
        PanelSpec(
            "Defects by product", "barchart",
            f"SELECT sum(\"defects\") AS \"defects\", sum(\"frames\") AS \"frames\" FROM \"defect_stats\" WHERE "
            f"\"window\" = '1m' AND {FILTER} AND $timeFilter GROUP BY \"product\"",
            (0, 0, 12, 9), Expect(("product",), ("defects", "frames")), "Defective and inspected frames per product.",
            unit="short", result_format="table", options=barchart_options("product"),
            custom={"fillOpacity": 80, "lineWidth": 1, "gradientMode": "none"}),
        PanelSpec(
            "Defect rate per product", "timeseries",
            f"SELECT sum(\"defects\") / sum(\"frames\") AS \"defect_rate\" FROM \"defect_stats\" WHERE "
            f"\"window\" = '$window' AND {FILTER} AND $timeFilter GROUP BY time($__interval), \"product\" fill(none)",
            (12, 0, 12, 9), Expect(("product",), ("defect_rate",)), "Defective frames / frames, per product.",
            unit="percentunit", alias="$tag_product", options=timeseries_options(), custom=timeseries_custom(),
            interval="10s"),
    ]
    # the 3x3 heat grid: one stat panel per cell, laid out like the frame, coloured by count
    for index, position in enumerate(POSITIONS):
        row, col = divmod(index, 3)
        panels.append(PanelSpec(
            position, "stat",
            f"SELECT sum(\"defects\") AS \"defects\" FROM \"defect_positions\" WHERE \"window\" = '1m' AND "
            f"\"position\" = '{position}' AND {FILTER} AND $timeFilter",
            (col * 4, 9 + row * 4, 4, 4), Expect((), ("defects",)),
            f"Defect regions found in the {position} cell of the frame (3x3 grid).", unit="short",
            options=stat_options(color_mode="background"),
            defaults={"thresholds": HEAT_THRESHOLDS, "color": {"mode": "thresholds"}, "noValue": "0"}))
    panels += [
        PanelSpec(
            "Defects by region size", "barchart",
            f"SELECT sum(\"defects\") AS \"defects\" FROM \"defect_sizes\" WHERE \"window\" = '1m' AND {FILTER} "
            f"AND $timeFilter GROUP BY \"size_class\"",
            (12, 9, 12, 12), Expect(("size_class",), ("defects",)),
            "Defect regions per size class (small < 1 mm² or 256 px, medium < 10 mm² or 4096 px, large).",
            unit="short", result_format="table", options=barchart_options("size_class"),
            custom={"fillOpacity": 80, "lineWidth": 1, "gradientMode": "none"}),
        PanelSpec(
            "Score distribution (score / threshold)", "barchart",
            f"SELECT sum(\"frames\") AS \"frames\" FROM \"score_histogram\" WHERE \"window\" = '1m' AND {FILTER} "
            f"AND $timeFilter GROUP BY \"bucket\"",
            (0, 21, 12, 9), Expect(("bucket",), ("frames",)),
            "Frames per bucket of anomaly score / threshold (upper edges; > 1.00 is flagged).", unit="short",
            result_format="table", options=barchart_options("bucket"),
            custom={"fillOpacity": 80, "lineWidth": 1, "gradientMode": "none"}),
        PanelSpec(
            "Score quantiles", "timeseries",
            f"SELECT max(\"score_p50\") AS \"p50\", max(\"score_p90\") AS \"p90\", max(\"score_p99\") AS \"p99\" "
            f"FROM \"defect_stats\" WHERE \"window\" = '$window' AND {FILTER} AND $timeFilter "
            f"GROUP BY time($__interval) fill(none)",
            (12, 21, 12, 9), Expect((), ("p50", "p90", "p99")), "Anomaly score quantiles of each window.",
            options=timeseries_options(), custom=timeseries_custom(), interval="10s"),
    ]
    return panels


DASHBOARDS: dict[str, tuple[str, str, callable]] = {
    "lineguard-overview": ("lineguard · line overview",
                           "Defect rate, throughput, latency, consumer lag and dead letters.", overview_panels),
    "lineguard-defects": ("lineguard · defects",
                          "Defects by product, position (3x3), region size, and the score distribution.",
                          defects_panels),
}


def _variables() -> list[dict]:
    def tag_variable(name: str) -> dict:
        return {"name": name, "label": name, "type": "query", "datasource": DATASOURCE,
                "query": f"SHOW TAG VALUES FROM \"defect_stats\" WITH KEY = \"{name}\"", "refresh": 2,
                "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
                "current": {"text": "All", "value": "$__all"}}

    window = {"name": "window", "label": "window", "type": "custom", "query": "10s,1m",
              "current": {"text": "10s", "value": "10s"},
              "options": [{"text": "10s", "value": "10s", "selected": True},
                          {"text": "1m", "value": "1m", "selected": False}]}
    return [tag_variable("line"), tag_variable("product"), window]


def panel_json(spec: PanelSpec, panel_id: int) -> dict:
    x, y, w, h = spec.grid
    target = {"refId": "A", "datasource": DATASOURCE, "query": spec.query, "rawQuery": True,
              "resultFormat": spec.result_format}
    if spec.alias:
        target["alias"] = spec.alias
    defaults: dict = dict(spec.defaults)
    if spec.unit:
        defaults["unit"] = spec.unit
    if spec.custom:
        defaults["custom"] = spec.custom
    panel = {"id": panel_id, "type": spec.type, "title": spec.title, "description": spec.description,
             "datasource": DATASOURCE, "gridPos": {"x": x, "y": y, "w": w, "h": h},
             "fieldConfig": {"defaults": defaults, "overrides": []}, "options": spec.options, "targets": [target]}
    if spec.interval:
        panel["interval"] = spec.interval
    return panel


def dashboard(uid: str) -> dict:
    title, description, panels = DASHBOARDS[uid]
    return {
        "uid": uid, "title": title, "description": description, "tags": ["lineguard"], "timezone": "browser",
        "editable": True, "graphTooltip": 1, "refresh": "10s", "schemaVersion": SCHEMA_VERSION,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": _variables()},
        "panels": [panel_json(spec, index + 1) for index, spec in enumerate(panels())],
    }


def panel_specs(uid: str) -> list[PanelSpec]:
    return DASHBOARDS[uid][2]()


def dumps(uid: str) -> str:
    return json.dumps(dashboard(uid), indent=2, ensure_ascii=False) + "\n"


def write_all(directory: Path = DASHBOARD_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for uid in DASHBOARDS:
        path = directory / f"{uid}.json"
        path.write_text(dumps(uid))
        written.append(path)
    return written


# -- the schema check (tsc against @grafana/schema) ---------------------------------------------
CHECK_PRELUDE = """\
// generated by deploy/grafana/dashboards.py: each dashboard JSON `satisfies` Grafana's published types
import type { Dashboard, FieldConfig, FieldConfigSource, Panel } from '@grafana/schema';
import type * as timeseries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';
import type * as stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as barchart from '@grafana/schema/dist/esm/raw/composable/barchart/panelcfg/x/BarChartPanelCfg_types.gen';

// JSON spells enum members as their values: turn enums into literal unions, recursively.
type Literal<T> = T extends string ? `${T}` : T extends number ? (`${T}` extends `${infer N extends number}` ? N : never) : T;
type Json<T> = T extends Array<infer U> ? Array<Json<U>> : T extends object ? { [K in keyof T]: Json<T[K]> } : Literal<T>;

// Grafana's InfluxDB query model (public/app/plugins/datasource/influxdb/types.ts), raw InfluxQL only
interface InfluxQLTarget {
  refId: string;
  datasource: { type: 'influxdb'; uid: string };
  query: string;
  rawQuery: true;
  resultFormat: 'time_series' | 'table';
  alias?: string;
}
type Typed<K extends string, O, F> = Omit<Json<Panel>, 'type' | 'options' | 'fieldConfig' | 'targets'> & {
  type: K;
  options: Json<O>;
  fieldConfig: Omit<Json<FieldConfigSource>, 'defaults'> & { defaults: Omit<Json<FieldConfig>, 'custom'> & { custom?: Json<F> } };
  targets: InfluxQLTarget[];
};
type LineguardPanel =
  | Typed<'timeseries', timeseries.Options, timeseries.FieldConfig>
  | Typed<'stat', stat.Options, Record<string, never>>
  | Typed<'barchart', barchart.Options, barchart.FieldConfig>;
type LineguardDashboard = Omit<Json<Dashboard>, 'panels'> & { panels: LineguardPanel[] };
"""  # noqa: E501 - TypeScript import paths are long


class SchemaCheckUnavailable(Exception):
    """node/npm are missing, or the npm packages could not be installed."""


def npm_install(directory: Path = SCHEMA_CHECK_DIR) -> Path:
    """Install @grafana/schema and typescript from the committed lock file; returns the tsc path."""
    npm = shutil.which("npm")
    if not npm or not shutil.which("node"):
        raise SchemaCheckUnavailable("node and npm are needed for the Grafana schema check")
    tsc = directory / "node_modules" / ".bin" / "tsc"
    schema = directory / "node_modules" / "@grafana" / "schema" / "package.json"
    if tsc.exists() and schema.exists():
        return tsc
    command = [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"]
    done = subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SchemaCheckUnavailable(f"npm ci failed in {directory}: {done.stderr.strip()[-800:]}")
    return tsc


def check_source(directory: Path = DASHBOARD_DIR) -> str:
    lines = [CHECK_PRELUDE]
    for path in sorted(directory.glob("*.json")):
        name = path.stem.replace("-", "_")
        lines.append(f"export const {name} = {path.read_text().strip()} satisfies LineguardDashboard;\n")
    return "\n".join(lines)


def schema_check(directory: Path = DASHBOARD_DIR) -> subprocess.CompletedProcess:
    """Run tsc --strict over the dashboards; returncode 0 means they match the schema types."""
    tsc = npm_install()
    with tempfile.TemporaryDirectory(dir=SCHEMA_CHECK_DIR, prefix=".check-") as scratch:
        source = Path(scratch) / "dashboards.check.ts"
        source.write_text(check_source(directory))
        command = [str(tsc), "--noEmit", "--strict", "--exactOptionalPropertyTypes", "--target", "es2022",
                   "--module", "esnext", "--moduleResolution", "bundler", "--skipLibCheck",
                   str(source)]
        return subprocess.run(command, cwd=SCHEMA_CHECK_DIR, capture_output=True, text=True, timeout=300)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--check" in argv:
        result = schema_check()
        sys.stdout.write(result.stdout + result.stderr)
        print("schema check:", "ok" if result.returncode == 0 else "FAILED")
        return result.returncode
    for path in write_all():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
