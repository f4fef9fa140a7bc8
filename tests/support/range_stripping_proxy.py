"""An HTTP reverse proxy for the tests that makes a registry ignore `Range`.

Usage: range_stripping_proxy.py LISTEN_PORT UPSTREAM_PORT

Every request is forwarded to http://127.0.0.1:UPSTREAM_PORT with its method, headers and body,
except the `Range` header, which is dropped: the registry then answers `200` with the whole blob,
as some registries do. `Location` headers that point at the upstream are rewritten to point at
this proxy. The response body bytes forwarded for blob GETs (`/v2/.../blobs/...`) are counted
and served as JSON at `GET /_count`:

    {"blob_bytes": N, "blob_gets": N, "ranges_stripped": N}

Standard library only.
"""

import http.client
import http.server
import json
import sys
import threading

LISTEN_PORT = int(sys.argv[1])
UPSTREAM_PORT = int(sys.argv[2])
UPSTREAM = f"127.0.0.1:{UPSTREAM_PORT}"
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
PIECE = 64 << 10

lock = threading.Lock()
counts = {"blob_bytes": 0, "blob_gets": 0, "ranges_stripped": 0}


def count(key, n):
    with lock:
        counts[key] += n


class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else None

    def forward(self):
        if self.path == "/_count":
            with lock:
                body = json.dumps(counts).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        body = self.read_body()
        headers = {}
        for k, v in self.headers.items():
            if k.lower() == "range":
                count("ranges_stripped", 1)
                continue
            if k.lower() not in HOP_BY_HOP:
                headers[k] = v
        if body is not None:
            headers["Content-Length"] = str(len(body))
        up = http.client.HTTPConnection(UPSTREAM, timeout=300)
        try:
            up.request(self.command, self.path, body=body, headers=headers)
            resp = up.getresponse()
            self.send_response(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            for k, v in resp.getheaders():
                if k.lower() in HOP_BY_HOP:
                    continue
                if k.lower() == "location":
                    v = v.replace(f"//{UPSTREAM}", f"//127.0.0.1:{LISTEN_PORT}")
                self.send_header(k, v)
            if self.command == "HEAD":
                if length is not None:
                    self.send_header("Content-Length", length)
                self.end_headers()
                return
            if length is None:
                data = resp.read()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self.send_header("Content-Length", length)
            self.end_headers()
            is_blob = self.command == "GET" and "/blobs/" in self.path
            if is_blob:
                count("blob_gets", 1)
            while True:
                piece = resp.read(PIECE)
                if not piece:
                    break
                self.wfile.write(piece)
                if is_blob:
                    count("blob_bytes", len(piece))
        except (BrokenPipeError, ConnectionResetError):
            # The client dropped the answer (e.g. a read it no longer needs): stop forwarding.
            self.close_connection = True
        finally:
            up.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = forward


server = http.server.ThreadingHTTPServer(("127.0.0.1", LISTEN_PORT), Proxy)
server.daemon_threads = True
server.serve_forever()
