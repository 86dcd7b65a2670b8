"""A webhook receiver for the compose stack's Alertmanager: logs every notification it gets.

Alertmanager's receivers in alerts/alertmanager.yml post to http://alert-sink:8080/critical and
/warning; `docker compose logs -f alert-sink` shows each notification (receiver, status, and per
alert its name, severity, service and description). Standard library only.
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            notification = json.loads(body)
        except ValueError:
            self.send_response(400)
            self.end_headers()
            return
        for alert in notification.get("alerts", []):
            labels = alert.get("labels", {})
            print(
                f"{self.path} {notification.get('receiver')} {alert.get('status', '').upper()} "
                f"{labels.get('alertname')} severity={labels.get('severity')} "
                f"service={labels.get('service_name')}: {alert.get('annotations', {}).get('description')}",
                flush=True,
            )
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # quiet: the alerts are the log
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    with ThreadingHTTPServer((args.host, args.port), _Handler) as server:
        print(f"alert-sink listening on {args.host}:{args.port}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
