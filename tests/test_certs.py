"""`m4fuse certs`: the chain verifies, SANs are present, keys load the way Flower loads them."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from m4fuse.cli.certs import make_certificates
from m4fuse.cli.main import main


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("certs")
    assert main(["certs", "--out", str(out), "--host", "link.example.org",
                 "--host", "10.0.0.5", "--supernodes", "2"]) == 0
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_chain_verifies_and_server_is_not_a_ca(made: Path) -> None:
    ca = _cert(made / "ca.crt")
    server = _cert(made / "server.crt")
    ca.verify_directly_issued_by(ca)  # self-signed root
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    # a certificate from another CA does not verify against this one
    other = make_certificates(made / "other", ["localhost"], [])
    with pytest.raises((InvalidSignature, ValueError)):  # signature / issuer name mismatch
        _cert(other.server_cert).verify_directly_issued_by(ca)


def test_chain_verifies_with_openssl(made: Path) -> None:
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", str(made / "ca.crt"), str(made / "server.crt")],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_sans_hold_dns_and_ip_hosts_and_loopback(made: Path) -> None:
    san = _cert(made / "server.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    dns = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    assert "link.example.org" in dns and "localhost" in dns
    assert ipaddress.ip_address("10.0.0.5") in ips
    assert ipaddress.ip_address("127.0.0.1") in ips  # the SuperLink's own ServerApp process
    assert "10.0.0.5" not in dns  # an IP must not be written as a DNS name


def test_private_keys_are_0600_and_load(made: Path) -> None:
    for name in ("ca.key", "server.key", "supernodes/supernode-1", "supernodes/supernode-2"):
        mode = stat.S_IMODE((made / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    server_key = serialization.load_pem_private_key((made / "server.key").read_bytes(), None)
    assert server_key.public_key().public_numbers() == (
        _cert(made / "server.crt").public_key().public_numbers()
    )


def test_supernode_keys_load_as_flower_loads_them(made: Path) -> None:
    # flower-supernode --auth-supernode-private-key: load_ssh_private_key, must be EC
    # flwr supernode register: load_ssh_public_key, EC on a NIST curve
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    seen = set()
    for i in (1, 2):
        priv = serialization.load_ssh_private_key(
            (made / "supernodes" / f"supernode-{i}").read_bytes(), None
        )
        assert isinstance(priv, ec.EllipticCurvePrivateKey)
        pub_bytes = try_load_public_key(made / "supernodes" / f"supernode-{i}.pub")
        assert pub_bytes == public_key_to_bytes(priv.public_key())
        seen.add(pub_bytes)
    assert len(seen) == 2  # distinct key pairs


def test_refuses_overwrite_and_bad_arguments(made: Path, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError, match="ca.key"):
        make_certificates(made, ["localhost"], [])
    with pytest.raises(ValueError, match="bad host!"):
        make_certificates(tmp_path, ["bad host!"], [])
    with pytest.raises(ValueError, match="../evil"):
        make_certificates(tmp_path, ["localhost"], ["../evil"])
    with pytest.raises(ValueError, match="days"):
        make_certificates(tmp_path, ["localhost"], [], days=0)


def test_named_supernodes_from_the_console(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "m4fuse.cli.main", "certs", "--out", str(tmp_path), "--host",
         "localhost", "--supernode-names", "hospital-a", "hospital-b"],
        capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "supernodes" / "hospital-b.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
