"""A throwaway certificate authority for TLS tests, built on trustme.

Everything here lives in memory until a ``write_*`` method puts PEM files in a
directory the caller owns (typically ``self.mktemp()`` in a trial test).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from twisted.internet import ssl

try:
    import trustme
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError("mailrelay.testing.tls needs trustme; install mailrelay[testing]") from e

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = ["ThrowawayCA"]


class ThrowawayCA:
    """A certificate authority that exists for one test run.

    It issues server certificates (cached per set of host names) and client
    certificates (cached per name), and hands out the Twisted objects and PEM
    files that servers and clients under test need to trust it.
    """

    def __init__(self) -> None:
        self._ca = trustme.CA()
        self._server_certs: dict[tuple[str, ...], trustme.LeafCert] = {}
        self._client_certs: dict[str, trustme.LeafCert] = {}

    @property
    def ca_cert_pem(self) -> bytes:
        """The CA certificate, PEM encoded."""
        return self._ca.cert_pem.bytes()

    def write_ca_file(self, directory: str | os.PathLike[str]) -> str:
        """Write the CA certificate to ``directory/ca.pem`` and return that path."""
        path = os.path.join(os.fspath(directory), "ca.pem")
        self._ca.cert_pem.write_to_path(path)
        return path

    def trust_root(self) -> IOpenSSLTrustRoot:
        """A Twisted trust root that accepts exactly the certificates this CA issued."""
        return ssl.trustRootFromCertificates([self._ca_certificate()])

    def server_options(
        self,
        hostnames: tuple[str, ...] | list[str] = ("localhost", "127.0.0.1"),
        require_client_cert: bool = False,
    ) -> ssl.CertificateOptions:
        """Twisted server TLS options presenting a certificate for ``hostnames``.

        The server always asks for a client certificate and checks any it gets
        against this CA; with ``require_client_cert`` the handshake fails
        without one.
        """
        key_and_cert = ssl.PrivateCertificate.loadPEM(
            self._server_cert(hostnames).private_key_and_cert_chain_pem.bytes()
        )
        # caCerts/verify rather than trustRoot: trustRoot always *requires* a
        # client certificate, and an optional one is what lets tests record the
        # subjects of clients that present one without failing those that don't.
        return ssl.CertificateOptions(
            privateKey=key_and_cert.privateKey.original,
            certificate=key_and_cert.original,
            verify=True,
            caCerts=[self._ca_certificate().original],
            requireCertificate=require_client_cert,
        )

    def write_server_cert(
        self,
        directory: str | os.PathLike[str],
        hostnames: tuple[str, ...] | list[str] = ("localhost", "127.0.0.1"),
    ) -> str:
        """Write the server certificate for ``hostnames`` (the one
        :meth:`server_options` presents) and its key to ``directory/server.pem``,
        for servers configured by file, such as an ``ssl:`` endpoint's
        ``privateKey=``; return that path."""
        path = os.path.join(os.fspath(directory), "server.pem")
        self._server_cert(hostnames).private_key_and_cert_chain_pem.write_to_path(path)
        return path

    def client_certificate(self, name: str = "client.example") -> ssl.PrivateCertificate:
        """A client certificate (and key) for ``name``, for Twisted TLS clients.

        ``name`` is both the DNS name in the certificate and its common name,
        which is what :attr:`FakeMTA.client_certificate_subjects` records.
        """
        return ssl.PrivateCertificate.loadPEM(
            self._client_cert(name).private_key_and_cert_chain_pem.bytes()
        )

    def write_client_cert(
        self, directory: str | os.PathLike[str], name: str = "client.example"
    ) -> tuple[str, str]:
        """Write a client certificate for ``name`` and its key; return both paths.

        The files are ``directory/<name>.crt`` and ``directory/<name>.key``.
        """
        leaf = self._client_cert(name)
        base = os.path.join(os.fspath(directory), name)
        cert_path, key_path = base + ".crt", base + ".key"
        for index, pem in enumerate(leaf.cert_chain_pems):
            pem.write_to_path(cert_path, append=index > 0)
        leaf.private_key_pem.write_to_path(key_path)
        return cert_path, key_path

    def _server_cert(self, hostnames: tuple[str, ...] | list[str]) -> trustme.LeafCert:
        names = tuple(hostnames)
        if not names:
            raise ValueError("a server certificate needs at least one host name")
        if names not in self._server_certs:
            self._server_certs[names] = self._ca.issue_cert(*names)
        return self._server_certs[names]

    def _client_cert(self, name: str) -> trustme.LeafCert:
        if name not in self._client_certs:
            self._client_certs[name] = self._ca.issue_cert(name, common_name=name)
        return self._client_certs[name]

    def _ca_certificate(self) -> ssl.Certificate:
        return ssl.Certificate.loadPEM(self.ca_cert_pem)
