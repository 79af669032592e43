"""The federation's TLS material: a CA, server certificates, client certificates (EC P-256).

Files written: `<dir>/ca.crt` + `ca.key`, `<out>/server.crt` + `server.key`,
`<out>/<name>.crt` + `<name>.key`. Private keys are 0600 (common.keyfile) and never
overwritten. Certificates are PEM. Validity is in days.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.fileio import atomic_write_bytes
from common.keyfile import read_private_file, write_private_file


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_private_file(
        path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    atomic_write_bytes(path, cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_dir = Path(ca_dir)
    cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key(read_private_file(ca_dir / "ca.key"), password=None)
    return cert, key


def _builder(subject: x509.Name, issuer: x509.Name, pub, days: int) -> x509.CertificateBuilder:
    # Backdate a little so a peer with a slightly slow clock accepts a fresh certificate.
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
    )


def make_ca(dir: Path, name: str, *, days: int = 3650) -> tuple[Path, Path]:
    """Create a self-signed CA `dir/ca.crt` and its key `dir/ca.key` (0600). Returns both paths."""
    dir = Path(dir)
    key = _new_key()
    # Never a bare `name`: a site of the same name would get a client certificate whose subject
    # equals the issuer's, which TLS stacks take for a self-signed certificate and refuse.
    subject = _name(f"plan-node federation CA ({name})")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _builder(subject, subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(dir / "ca.key", key)
    _write_cert(dir / "ca.crt", cert)
    return dir / "ca.crt", dir / "ca.key"


def _issue(ca_dir: Path, out_dir: Path, stem: str, common_name: str, san: list, usage, days: int) -> tuple[Path, Path]:
    ca_cert, ca_key = _load_ca(ca_dir)
    key = _new_key()
    builder = (
        _builder(_name(common_name), ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out_dir = Path(out_dir)
    _write_key(out_dir / f"{stem}.key", key)
    _write_cert(out_dir / f"{stem}.crt", cert)
    return out_dir / f"{stem}.crt", out_dir / f"{stem}.key"


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_server_cert(
    ca_dir: Path, out_dir: Path, hosts: list[str] = ("localhost", "127.0.0.1", "::1"), *, days: int = 825
) -> tuple[Path, Path]:
    """`out_dir/server.crt` + `server.key` signed by the CA in `ca_dir`, valid for `hosts`."""
    hosts = list(hosts)
    if not hosts:
        raise ValueError("issue_server_cert: at least one host name or IP address is required")
    return _issue(
        ca_dir, out_dir, "server", hosts[0], [_san_entry(h) for h in hosts], ExtendedKeyUsageOID.SERVER_AUTH, days
    )


def certificate_names(pem: bytes) -> list[str]:
    """The DNS names and IP addresses (as text) a PEM certificate's subjectAltName covers."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def address_host(address: str) -> str:
    """The host of "host:port" or "[v6]:port"."""
    host = address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def issue_client_cert(ca_dir: Path, out_dir: Path, name: str, *, days: int = 825) -> tuple[Path, Path]:
    """`out_dir/<name>.crt` + `<name>.key` (CN = name) for mutual TLS, signed by the CA in `ca_dir`."""
    return _issue(ca_dir, out_dir, name, name, [x509.DNSName(name)], ExtendedKeyUsageOID.CLIENT_AUTH, days)


def certificate_common_name(pem: bytes) -> str:
    """The subject CN of a PEM certificate (e.g. the site name of a client certificate)."""
    cert = x509.load_pem_x509_certificate(pem)
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""
