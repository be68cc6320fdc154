"""The node's TLS certificate for the gRPC data plane (mTLS between members).

gRPC's BoringSSL offers no Ed25519 signature algorithm in the TLS handshake (measured: grpcio 1.85,
NO_COMMON_SIGNATURE_ALGORITHMS), so the TLS key is an ECDSA P-256 key made fresh at every start and
kept in memory only. It is bound to the node's Ed25519 identity by the signed advert, which carries
the certificate: peers pin exactly that certificate for this node id, and accept this node as a client
only while its advert (with that certificate) is in their PeerTable.
"""

from __future__ import annotations

import datetime
from functools import lru_cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_VALID_DAYS = 365  # regenerated at every start; the validity only bounds a never-restarted node
MAX_CERT_CHARS = 1024  # a P-256 self-signed PEM is about 560 characters
_PEM_HEAD = "-----BEGIN CERTIFICATE-----\n"


def make_tls_cert(node_id: str) -> tuple[bytes, str]:
    """A fresh (private key PEM, certificate PEM): self-signed, CN and SAN (DNS) = the node id."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # clocks of members differ a little
        .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)  # its own trust anchor
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


@lru_cache(maxsize=512)
def cert_matches(cert_pem: str, node_id: str) -> bool:
    """True when `cert_pem` is one PEM certificate with a P-256 key whose only SAN is `node_id`.

    Peer input: parsed by `cryptography` before any of it reaches BoringSSL (cached: adverts repeat).
    """
    if len(cert_pem) > MAX_CERT_CHARS or not cert_pem.startswith(_PEM_HEAD) or cert_pem.count("-----BEGIN") != 1:
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
        key = cert.public_key()
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except (ValueError, UnicodeEncodeError, x509.ExtensionNotFound):
        return False
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1) and names == [node_id]
