"""Push the InfluxDB datasource and the lineguard dashboards to a Grafana, through its HTTP API.

    >>> report = push("http://grafana:3000", token="glsa_...", influx_url="http://influxdb:8086",
    ...               database="lineguard")

Uses `grafana-api` (GrafanaFace). The requests, in order:
1. `GET /api/datasources/name/lineguard-influxdb`, then `PUT /api/datasources/<id>` when it exists,
   else `POST /api/datasources`;
2. `GET /api/folders/lineguard`, and `POST /api/folders` when missing;
3. `POST /api/dashboards/db` per dashboard, with `overwrite: true` into the `lineguard` folder.

Pushing twice is harmless. `token` is an API / service-account token; `user:password` is sent as
basic auth instead (a fresh Grafana's admin:admin).
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field

from deploy.grafana.dashboards import DASHBOARD_DIR, DATASOURCE_UID

FOLDER_UID = "lineguard"


class GrafanaPushError(Exception):
    """Grafana refused a request or cannot be reached; the message says which and why."""


@dataclass
class PushReport:
    datasource: str = ""                        # "created" | "updated"
    folder: str = ""                            # "created" | "exists"
    dashboards: dict[str, str] = field(default_factory=dict)   # uid -> url


def datasource_payload(influx_url: str, database: str, username: str | None = None,
                       password: str | None = None) -> dict:
    payload = {"name": DATASOURCE_UID, "uid": DATASOURCE_UID, "type": "influxdb", "access": "proxy",
               "url": influx_url, "database": database, "isDefault": False,
               "jsonData": {"dbName": database, "httpMode": "GET", "version": "InfluxQL"}}
    if username:
        payload["user"] = username
        payload["secureJsonData"] = {"password": password or ""}
    return payload


def grafana_client(url: str, token: str, timeout_s: float = 10.0):
    from grafana_api.grafana_face import GrafanaFace

    parsed = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
    if not parsed.hostname:
        raise GrafanaPushError(f"not a Grafana URL: {url!r}")
    prefix = parsed.path.strip("/")
    auth = tuple(token.split(":", 1)) if ":" in token else token
    return GrafanaFace(auth=auth, host=parsed.hostname, port=parsed.port, protocol=parsed.scheme,
                       url_path_prefix=f"{prefix}/" if prefix else "", timeout=timeout_s)


def push(url: str, token: str, *, influx_url: str, database: str, influx_username: str | None = None,
         influx_password: str | None = None, dashboards_dir=DASHBOARD_DIR) -> PushReport:
    from grafana_api.grafana_api import GrafanaClientError, GrafanaException
    from requests import RequestException

    client = grafana_client(url, token)
    report = PushReport()
    try:
        payload = datasource_payload(influx_url, database, influx_username, influx_password)
        try:
            existing = client.datasource.get_datasource_by_name(DATASOURCE_UID)
        except GrafanaClientError as exc:
            if exc.status_code != 404:
                raise
            client.datasource.create_datasource(payload)
            report.datasource = "created"
        else:
            client.datasource.update_datasource(existing["id"], payload)
            report.datasource = "updated"

        try:
            client.folder.get_folder(FOLDER_UID)
            report.folder = "exists"
        except GrafanaClientError as exc:
            if exc.status_code != 404:
                raise
            client.folder.create_folder("lineguard", uid=FOLDER_UID)
            report.folder = "created"

        for path in sorted(dashboards_dir.glob("*.json")):
            board = json.loads(path.read_text())
            board.pop("id", None)
            answer = client.dashboard.update_dashboard({"dashboard": board, "folderUid": FOLDER_UID,
                                                        "overwrite": True, "message": "lineguard grafana push"})
            report.dashboards[board["uid"]] = answer.get("url", "") if isinstance(answer, dict) else ""
    except GrafanaException as exc:
        raise GrafanaPushError(f"Grafana at {url} refused the push: {exc.message}") from None
    except RequestException as exc:
        raise GrafanaPushError(f"cannot reach Grafana at {url}: {type(exc).__name__}: {exc}") from None
    return report
