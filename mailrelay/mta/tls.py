"""Client TLS options for the smarthost connection, built on Twisted's TLS.

verify_cert and verify_hostname mirror Mailman's two switches: full
verification uses ``optionsForClientTLS`` (chain plus service_identity name
check); chain-only and no-verification use ``CertificateOptions``, which sends
no SNI by itself, so :class:`_WithServerName` adds it: servers hosting several
names need SNI to pick the right certificate even when we do not check it.
"""

from __future__ import annotations

from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from mailrelay.addresses import is_ip_address
from mailrelay.errors import ConfigurationError


@implementer(IOpenSSLClientConnectionCreator)
class _WithServerName:
    def __init__(self, hostname: str, options):
        self._server_name = hostname.encode("idna")
        self._options = options

    def clientConnectionForTLS(self, tlsProtocol):  # noqa: N802 (Twisted interface)
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        connection.set_tlsext_host_name(self._server_name)
        return connection


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigurationError(f"cannot read {what} {path!r}: {e.strerror}") from None


def load_trust_root(ca_file: str | None):
    """The CAs of ``ca_file`` (PEM, several allowed), or the platform's trust store."""
    if not ca_file:
        return ssl.platformTrust()
    pem = _read(ca_file, "CA file")
    blocks = [
        b"-----BEGIN CERTIFICATE-----" + part
        for part in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]
    ]
    if not blocks:
        raise ConfigurationError(f"CA file {ca_file!r} holds no PEM certificate")
    try:
        return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
    except Exception as e:
        raise ConfigurationError(f"CA file {ca_file!r} is not valid PEM: {e}") from None


def load_client_certificate(cert_file: str | None, key_file: str | None):
    """The client certificate and key as a PrivateCertificate, or None."""
    if not cert_file and not key_file:
        return None
    if not (cert_file and key_file):
        raise ConfigurationError(
            "a client certificate needs both a certificate file and a key file"
        )
    cert, key = _read(cert_file, "client certificate"), _read(key_file, "client key")
    try:
        return ssl.PrivateCertificate.loadPEM(cert + b"\n" + key)
    except Exception as e:
        raise ConfigurationError(
            f"client certificate {cert_file!r} / key {key_file!r} unusable: {e}"
        ) from None


def client_tls_options(
    hostname: str,
    *,
    verify_cert: bool = True,
    verify_hostname: bool = True,
    ca_file: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
):
    """Connection creator for a TLS client connection to ``hostname``.

    The hostname check is ignored without the certificate check, as in Mailman.
    SNI is sent for DNS names in every mode (never for IP literals, per RFC 6066).
    """
    client_certificate = load_client_certificate(client_cert, client_key)
    if verify_cert and verify_hostname:
        return ssl.optionsForClientTLS(
            hostname, trustRoot=load_trust_root(ca_file), clientCertificate=client_certificate
        )
    extra = {}
    if client_certificate is not None:
        extra = {
            "privateKey": client_certificate.privateKey.original,
            "certificate": client_certificate.original,
        }
    if verify_cert:
        options = ssl.CertificateOptions(trustRoot=load_trust_root(ca_file), **extra)
    else:
        options = ssl.CertificateOptions(**extra)
    if is_ip_address(hostname):
        return options
    return _WithServerName(hostname, options)
