"""A Docker registry token service (the "Bearer" auth flow) for the podfs tests.

Usage: token_server.py PORT CERT_PATH USER PASSWORD ISSUER SERVICE

Generates an RSA key and a self-signed certificate (written to CERT_PATH, the registry's
`auth.token.rootcertbundle`), then answers GET /token?service=..&scope=.. : with the right Basic
credentials it grants every requested scope (JWT, RS256, x5c header); without credentials it
grants nothing (an anonymous token); with wrong ones it answers 401.
"""
import base64, datetime, json, sys, time, uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

port, cert_path, user, password, issuer, service = sys.argv[1:7]
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "podfs-test-token-issuer")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (
    x509.CertificateBuilder()
    .subject_name(name)
    .issuer_name(name)
    .public_key(key.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(now - datetime.timedelta(days=1))
    .not_valid_after(now + datetime.timedelta(days=2))
    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    .sign(key, hashes.SHA256())
)
with open(cert_path + ".tmp", "wb") as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM))
import os
os.rename(cert_path + ".tmp", cert_path)
x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(access):
    header = {"typ": "JWT", "alg": "RS256", "x5c": [x5c]}
    t = int(time.time())
    claims = {"iss": issuer, "sub": user, "aud": service, "exp": t + 300, "nbf": t - 10,
              "iat": t, "jti": str(uuid.uuid4()), "access": access}
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64(sig)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        q = parse_qs(urlparse(self.path).query)
        auth = self.headers.get("Authorization", "")
        access = []
        if auth.startswith("Basic "):
            u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
            if (u, p) != (user, password):
                self.send_response(401)
                self.end_headers()
                self.wfile.write(b'{"details":"invalid credentials"}')
                return
            for scope in q.get("scope", []):
                for one in scope.split(" "):
                    kind, _, rest = one.partition(":")
                    repo, _, actions = rest.rpartition(":")
                    access.append({"type": kind, "name": repo, "actions": actions.split(",")})
        body = json.dumps({"token": token(access), "expires_in": 300}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ThreadingHTTPServer(("127.0.0.1", int(port)), Handler).serve_forever()
