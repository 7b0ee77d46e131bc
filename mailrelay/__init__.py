"""mailrelay: a Twisted LMTP-to-SMTP relay for mailing lists."""

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]
