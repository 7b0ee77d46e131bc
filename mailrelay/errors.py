"""Exceptions shared across mailrelay's layers."""

from __future__ import annotations


class MailrelayError(Exception):
    """Base class of mailrelay's own errors."""


class ConfigurationError(MailrelayError):
    """A setting is missing or wrong; the message names file, section, key and value."""


class RegistryError(MailrelayError):
    """A registry operation was refused (unknown list, duplicate, bad address)."""


class RegistryUnavailable(MailrelayError):
    """The registry cannot be read right now: a temporary condition (451 at RCPT)."""


class SpoolError(MailrelayError):
    """The spool could not store a message; temporary (451/452), never 5xx."""

    def __init__(self, message: str, *, disk_full: bool = False):
        super().__init__(message)
        self.disk_full = disk_full


class StateDirectoryInUse(MailrelayError):
    """Another process (a running daemon) holds the lock on the state directory."""

    def __init__(self, directory: str, pid: int | None):
        holder = f"pid {pid}" if pid is not None else "a process whose pid is not recorded"
        super().__init__(
            f"{directory} is in use by another mailrelay daemon ({holder}): stop it, "
            f"or give this one another [paths] var_dir"
        )
        self.directory = directory
        self.pid = pid


class InvalidAddress(MailrelayError, ValueError):
    """An address is not a valid RFC 5321 mailbox."""

    def __init__(self, address: object, reason: str):
        super().__init__(f"invalid address {address!r}: {reason}")
        self.address = address
        self.reason = reason
