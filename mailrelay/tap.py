"""``twistd mailrelay``: command-line options and the service maker."""

from __future__ import annotations

import os

from twisted.python import usage

from mailrelay.config import CONFIG_ENVIRONMENT_VARIABLE, load_settings
from mailrelay.errors import ConfigurationError


class Options(usage.Options):
    synopsis = "[-C CONFIG]"
    longdesc = (
        "Run the mailrelay LMTP server, spool and delivery runner. Without -C the "
        f"file named by ${CONFIG_ENVIRONMENT_VARIABLE} is read, and without that the embedded "
        "defaults apply (LMTP on 127.0.0.1:8024, spool under ./var, smarthost localhost:25)."
    )
    optParameters = [
        ["config", "C", None, "configuration file (INI)"],
    ]

    def postOptions(self):  # noqa: N802
        path = self["config"] or os.environ.get(CONFIG_ENVIRONMENT_VARIABLE) or None
        try:
            self["settings"] = settings = load_settings(path)
            check_outbound(settings)
        except ConfigurationError as e:
            raise usage.UsageError(str(e)) from None


def check_outbound(settings) -> None:
    """Load the TLS material and credentials file the smarthost connection will
    use, so that a file that exists but is unusable (not PEM, a malformed
    authinfo line) stops twistd with a one-line error instead of a traceback."""
    from mailrelay.mta.credentials import CredentialsFile
    from mailrelay.mta.tls import client_tls_options
    from mailrelay.service import connection_arguments, tls_arguments

    arguments = connection_arguments(settings)
    if arguments["secure_mode"] != "smtp":
        client_tls_options(arguments["host"], **tls_arguments(settings))
    if arguments["credentials_file"]:
        CredentialsFile.load(arguments["credentials_file"])


def makeService(options):  # noqa: N802
    # The reactor is imported here, never at module level: twistd installs the
    # one chosen with -r before calling us.
    from twisted.internet import reactor

    from mailrelay.service import makeService as make

    return make(options["settings"], reactor)
