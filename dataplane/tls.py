"""mTLS on the data plane: gRPC credentials from this node's TLS certificate and its members' ones.

- A client pins the server: its only root certificate is the one in that node's signed advert, and the
  name checked is the node id (`grpc.ssl_target_name_override`), so a server holding any other key is
  refused in the handshake, whatever address it answers on.
- A server asks every client for a certificate (`require_client_auth`) and trusts only the
  certificates of the members in its PeerTable right now (plus its own): gRPC calls the fetcher below
  on each new handshake, and it hands gRPC a new configuration whenever that set has changed.
- The mesh token stays on every call as a second factor (`rpc.check_token`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import grpc

from discovery.tls_cert import make_tls_cert

log = logging.getLogger(__name__)

MemberCerts = Callable[[], Iterable[str]]  # the certificate PEMs of the current members


class MeshTls:
    def __init__(self, node_id: str, member_certs: MemberCerts) -> None:
        self.node_id = node_id
        self._key_pem, self.cert_pem = make_tls_cert(node_id)
        self._members = member_certs
        self._roots: frozenset[str] = frozenset({self.cert_pem})

    def _config(self, roots: frozenset[str]) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self._key_pem, self.cert_pem.encode("ascii"))],
            root_certificates="".join(sorted(roots)).encode("ascii"),
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Runs on a gRPC core thread before each handshake; None keeps the current configuration."""
        try:
            roots = frozenset(self._members()) | {self.cert_pem}
        except RuntimeError:  # the table changed under us (it lives on the event loop): keep the last set
            return None
        if roots == self._roots:
            return None
        self._roots = roots
        return self._config(roots)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._config(self._roots), self._fetch, require_client_authentication=True
        )

    def channel_credentials(self, peer_cert_pem: str) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=peer_cert_pem.encode("ascii"),
            private_key=self._key_pem,
            certificate_chain=self.cert_pem.encode("ascii"),
        )
