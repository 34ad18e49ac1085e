"""``m4fuse certs``: development TLS certificates and SuperNode key pairs for a deployment.

Writes, under ``--out``:

- ``ca.crt`` / ``ca.key``: a self-signed development certificate authority (EC P-384);
- ``server.crt`` / ``server.key``: the SuperLink's certificate, signed by that CA, with a
  subject-alternative name for every ``--host`` (DNS names and IP addresses) plus
  ``localhost``, ``127.0.0.1`` and ``::1`` (the SuperLink starts its ServerApp process on the
  loopback address and that process checks the certificate too);
- ``supernodes/<name>`` / ``supernodes/<name>.pub``: one EC P-384 key pair per SuperNode, the
  private key in OpenSSH format (what ``flower-supernode --auth-supernode-private-key`` reads
  with ``load_ssh_private_key``) and the public key as an OpenSSH line (what ``flwr supernode
  register KEY.pub CONNECTION`` reads with ``load_ssh_public_key``; Flower asks for a NIST
  curve).

Private keys are written with mode 0600. These are for development and pilots; a production
deployment uses the hospital network's own PKI for the server certificate (the SuperNode key
pairs are still made per hospital, and only the ``.pub`` file leaves the hospital).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Names always added to the server certificate: the SuperLink's own ServerApp process and
#: local tools reach it on the loopback address.
LOOPBACK_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
#: Curve of every key (P-384: a NIST curve, as Flower's SuperNode authentication requires).
CURVE = ec.SECP384R1
#: Default validity of the development certificates, in days.
DEFAULT_DAYS = 365
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DNS = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                  r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


@dataclass(frozen=True)
class CertificateSet:
    """Paths of everything :func:`make_certificates` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    supernode_keys: dict[str, tuple[Path, Path]]  # name -> (private key, public key)


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write ``data`` to ``path``; private files are created with mode 0600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)  # an existing file keeps its old mode through O_CREAT


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(host: str) -> x509.GeneralName:
    """A host as a SAN entry: an IP address when it parses as one, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _check_host(host: str) -> str:
    """Return ``host`` stripped, or raise when it is neither an IP address nor a DNS name."""
    host = host.strip()
    if _is_ip(host):
        return host
    if not _DNS.match(host):
        raise ValueError(f"--host {host!r} is not a host name or IP address")
    return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_names(hosts: list[str], supernodes: list[str], days: int) -> list[str]:
    """Validate the arguments of :func:`make_certificates`; returns the checked hosts."""
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    if not hosts:
        raise ValueError("at least one --host is needed (the SuperLink's name or address)")
    for name in supernodes:
        if not _NAME.match(name):
            raise ValueError(
                f"SuperNode name {name!r} must be letters, digits, '.', '_' or '-' "
                "(it becomes a file name)"
            )
    if len(set(supernodes)) != len(supernodes):
        raise ValueError(f"SuperNode names repeat: {supernodes}")
    return [_check_host(h) for h in hosts]


def _certificate_set(out: Path, supernodes: list[str], overwrite: bool) -> CertificateSet:
    """The paths :func:`make_certificates` writes; refuses existing ones unless ``overwrite``."""
    result = CertificateSet(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.crt",
        server_key=out / "server.key",
        supernode_keys={
            n: (out / "supernodes" / n, out / "supernodes" / f"{n}.pub") for n in supernodes
        },
    )
    targets = [result.ca_cert, result.ca_key, result.server_cert, result.server_key]
    targets += [p for pair in result.supernode_keys.values() for p in pair]
    if not overwrite:
        existing = [str(p) for p in targets if p.exists()]
        if existing:
            raise FileExistsError(
                f"refusing to overwrite {', '.join(existing)} (pass --overwrite to replace)"
            )
    return result


def _key_usage(*, cert_sign: bool, key_agreement: bool) -> x509.KeyUsage:
    """Digital signature plus certificate/CRL signing (a CA) or key agreement (a server)."""
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=key_agreement, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _make_ca(not_before: dt.datetime, not_after: dt.datetime
             ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed development CA (P-384, SHA-384) that may sign end certificates only."""
    ca_key = ec.generate_private_key(CURVE())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "M4Fuse-FL development"),
            x509.NameAttribute(NameOID.COMMON_NAME, "M4Fuse-FL development CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True, key_agreement=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )
    return ca_key, ca_cert


def _make_server_certificate(
    hosts: list[str], ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
    not_before: dt.datetime, not_after: dt.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's key and certificate, signed by the CA: common name ``hosts[0]``, every
    host and :data:`LOOPBACK_HOSTS` as subject alternative names."""
    san_hosts = list(dict.fromkeys([*hosts, *LOOPBACK_HOSTS]))  # keep order, drop repeats
    server_key = ec.generate_private_key(CURVE())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "M4Fuse-FL development"),
                    x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in san_hosts]), False)
        .add_extension(_key_usage(cert_sign=False, key_agreement=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return server_key, server_cert


def _write_supernode_key(name: str, priv_path: Path, pub_path: Path) -> None:
    """A SuperNode's P-384 key pair in OpenSSH format (what ``flwr supernode register`` and
    ``--auth-supernode-private-key`` read)."""
    key = ec.generate_private_key(CURVE())
    _write(
        priv_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        private=True,
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(pub_path, public + f" m4fuse-supernode-{name}\n".encode(), private=False)


def make_certificates(
    out_dir: str | Path,
    hosts: list[str],
    supernodes: list[str],
    days: int = DEFAULT_DAYS,
    overwrite: bool = False,
) -> CertificateSet:
    """Create a development CA, a SuperLink certificate and SuperNode key pairs.

    Args:
        out_dir: folder to write into (created when missing).
        hosts: names and addresses the SuperNodes use to reach the SuperLink; each becomes a
            SAN (DNS or IP) of the server certificate, next to :data:`LOOPBACK_HOSTS`. The
            first one is the certificate's common name.
        supernodes: names of the SuperNode key pairs (file names under ``supernodes/``).
        days: validity of the CA and server certificates (default 365).
        overwrite: replace existing files; by default an existing file is an error.

    Returns:
        The paths written.

    Raises:
        ValueError: a bad host, name or ``days``.
        FileExistsError: a file to be written exists and ``overwrite`` is false.
    """
    hosts = _check_names(hosts, supernodes, days)
    result = _certificate_set(Path(out_dir), supernodes, overwrite)
    now = dt.datetime.now(dt.timezone.utc)
    not_before = now - dt.timedelta(minutes=5)  # tolerate small clock differences
    not_after = now + dt.timedelta(days=days)
    ca_key, ca_cert = _make_ca(not_before, not_after)
    server_key, server_cert = _make_server_certificate(hosts, ca_key, ca_cert, not_before, not_after)
    _write(result.ca_key, _pem_key(ca_key), private=True)
    _write(result.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(result.server_key, _pem_key(server_key), private=True)
    _write(
        result.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False
    )
    for name, (priv_path, pub_path) in result.supernode_keys.items():
        _write_supernode_key(name, priv_path, pub_path)
    return result


def _supernode_names(count: int, names: list[str] | None) -> list[str]:
    if names:
        if count and count != len(names):
            raise ValueError(f"--supernodes {count} but {len(names)} --supernode-names: {names}")
        return list(names)
    if count < 0:
        raise ValueError(f"--supernodes must be >= 0, got {count}")
    return [f"supernode-{i}" for i in range(1, count + 1)]


def run(args: argparse.Namespace) -> int:
    """Entry point of ``m4fuse certs``: write the files and print where they went."""
    try:
        names = _supernode_names(args.supernodes, args.supernode_names)
        made = make_certificates(
            args.out, args.host, names, days=args.days, overwrite=args.overwrite
        )
    except (ValueError, FileExistsError) as err:
        print(f"m4fuse certs: error: {err}", file=sys.stderr)
        return 2
    print(f"CA certificate:     {made.ca_cert}  (to every SuperNode and `flwr` user)")
    print(f"CA key:             {made.ca_key}  (keep offline)")
    print(f"SuperLink TLS:      {made.server_cert}  {made.server_key}")
    for name, (priv, pub) in made.supernode_keys.items():
        print(f"SuperNode {name}: private {priv} (stays at the hospital), public {pub}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``m4fuse certs`` to the console command."""
    parser = sub.add_parser(
        "certs",
        help="make a development CA, SuperLink TLS certificate and SuperNode key pairs",
        description="Development TLS material for `flower-superlink` (CA and server "
        "certificate) and SuperNode authentication key pairs (OpenSSH EC P-384).",
    )
    parser.add_argument("--out", required=True, help="folder to write into")
    parser.add_argument(
        "--host",
        action="append",
        required=True,
        help="SuperLink host name or IP the SuperNodes connect to (repeatable); "
        "localhost, 127.0.0.1 and ::1 are always added",
    )
    parser.add_argument(
        "--supernodes", type=int, default=0, help="number of SuperNode key pairs (default 0)"
    )
    parser.add_argument(
        "--supernode-names",
        nargs="+",
        metavar="NAME",
        help="name the key pairs (e.g. one per hospital) instead of supernode-1..N",
    )
    parser.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    parser.set_defaults(func=run)
