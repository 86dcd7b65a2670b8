"""Throw-away certificates for TLS tests, made with the ``openssl`` command line tool.

(The ``cryptography`` package is not a dependency of the project; ``openssl`` ships with every system
that has a TLS-enabled ``redis-server``.)
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CertificateAuthority", "ServerCertificate", "make_ca", "make_server_cert"]


@dataclass(frozen=True)
class CertificateAuthority:
    """A self-signed CA: its certificate (the trust anchor clients load) and key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerCertificate:
    """A server certificate for 127.0.0.1 / localhost signed by a CA, and its key."""

    cert: Path
    key: Path
    ca: CertificateAuthority


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise RuntimeError("openssl not found: it is needed to make test certificates")
    done = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{done.stderr}")


def make_ca(directory: Path, name: str) -> CertificateAuthority:
    """A new self-signed CA (EC P-256, valid one day) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return CertificateAuthority(cert, key)


def make_server_cert(directory: Path, ca: CertificateAuthority, name: str = "server") -> ServerCertificate:
    """A server certificate for ``IP:127.0.0.1`` and ``DNS:localhost`` signed by ``ca``."""
    cert, key, csr = directory / f"{name}.crt", directory / f"{name}.key", directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
        "-out", str(cert), "-days", "1", "-extfile", str(ext),
        cwd=directory,
    )  # fmt: skip
    return ServerCertificate(cert, key, ca)
