"""What clients send to and get from the loopback Hub: every request with its body and response sizes.

    traffic = Traffic(hub)          # hub: a running HubServer (the `hub` fixture)
    ...                             # publish, fetch, load_dataset ...
    calls = traffic.take()          # and start counting afresh

Sizes are the HTTP bodies (a HEAD response has none); headers are not counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Call:
    method: str
    path: str  # without the query
    sent: int  # request body bytes
    received: int  # response body bytes

    @property
    def kind(self) -> str:
        """``upload`` (an LFS object's bytes), ``download`` (a file's bytes or its HEAD), ``commit``,
        ``preupload``, ``lfs-batch``, ``lfs-verify`` or ``api``."""
        if self.path.startswith("/lfs-upload/"):
            return "upload"
        if self.path.startswith("/lfs-verify/"):
            return "lfs-verify"
        if "/resolve/" in self.path:
            return "download"
        if re.search(r"/commit/", self.path):
            return "commit"
        if "/preupload/" in self.path:
            return "preupload"
        if self.path.endswith("/info/lfs/objects/batch"):
            return "lfs-batch"
        return "api"


class Traffic:
    def __init__(self, server):
        self.calls: list[Call] = []
        inner = server.handle

        def handle(method, raw_path, headers, body):
            status, out_headers, payload = inner(method, raw_path, headers, body)
            self.calls.append(Call(method, raw_path.split("?")[0], len(body),
                                   0 if method == "HEAD" else len(payload)))
            return status, out_headers, payload

        server.handle = handle

    def take(self) -> list[Call]:
        calls, self.calls = self.calls, []
        return calls


def total(calls: list[Call], kind: str | None = None) -> tuple[int, int, int]:
    """(requests, bytes sent, bytes received), of one kind or of all."""
    chosen = [c for c in calls if kind is None or c.kind == kind]
    return len(chosen), sum(c.sent for c in chosen), sum(c.received for c in chosen)
