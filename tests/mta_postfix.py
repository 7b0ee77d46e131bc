"""A private Postfix, and a private Dovecot as its SASL server, for interop tests.

Not a test module itself.  Each instance has its own configuration, queue and
log under a directory of the test, never the machine's ``/etc/postfix`` or
``/etc/dovecot``; both must be started as root (skipped locally without it,
failed under ``MAILRELAY_REQUIRE_PEERS=1``).

* :class:`PrivatePostfix` - a Postfix master on 127.0.0.1 with a master.cf of
  its own; ``main_cf`` lines are added to the base main.cf.
* :func:`start_chain` - the chain of :mod:`tests.test_postfix_integration`:
  Postfix in front of mailrelay (LMTP through the transport map that
  ``mailrelay postfix-maps`` writes) and behind it (as smarthost, relaying to
  the members' server).
* :class:`PrivateDovecot` - ``dovecot -F -c conf``: only its auth service,
  with a passwd-file, listening on a unix socket for Postfix's
  ``smtpd_sasl_type = dovecot``.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from dataclasses import dataclass

from mailrelay import cli
from tests.support import free_port, missing_peer, require_program, stop_process, wait_for_port

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
lmtp      unix  - - n - - lmtp
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {tmp}/queue
data_directory = {tmp}/data
maillog_file = {tmp}/maillog
maillog_file_prefixes = {tmp}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.test
mydestination =
mynetworks = 127.0.0.0/8
relay_domains = hash:{tmp}/conf/domains
transport_maps = hash:{tmp}/conf/transport
relay_recipient_maps = hash:{tmp}/conf/transport
recipient_delimiter = +
smtputf8_enable = no
biff = no
"""


def _merge(base: str, overrides: str) -> str:
    """main.cf ``base`` with each ``name = value`` of ``overrides`` in place of its own."""
    settings: dict[str, str] = {}
    for line in (base + overrides).splitlines():
        if line.strip() and not line.startswith("#"):
            name = line.split("=", 1)[0].strip()
            settings[name] = line
    return "".join(line + "\n" for line in settings.values())


def require_postfix() -> None:
    """Skip (locally) or fail (CI) unless a private Postfix can be started here."""
    require_program("postfix")
    if os.geteuid() != 0:
        missing_peer("a private Postfix master must be started as root")


class PrivatePostfix:
    """A Postfix master process with its own configuration under ``tmp``.

    ``main_cf`` lines replace those of :data:`MAIN_CF` with the same name
    and add the others; ``transport`` and ``domains`` in ``conf`` start empty.
    """

    def __init__(self, tmp: str, port: int, main_cf: str = ""):
        self.tmp, self.port = tmp, port
        os.chmod(tmp, 0o755)  # Postfix daemons run as the postfix user
        self.conf = os.path.join(tmp, "conf")
        for d in ("conf", "queue", "data"):
            os.makedirs(os.path.join(tmp, d), exist_ok=True)
        shutil.chown(os.path.join(tmp, "data"), "postfix")
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write(_merge(MAIN_CF.format(tmp=tmp), main_cf))
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(port=port))
        for name in ("transport", "domains"):
            open(os.path.join(self.conf, name), "a").close()

    def postmap(self, name: str):
        subprocess.run(
            [require_program("postmap"), "-c", self.conf, os.path.join(self.conf, name)], check=True
        )

    def command(self, action: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [require_program("postfix"), "-c", self.conf, action],
            capture_output=True,
            text=True,
            check=False,
        )

    async def start(self, case, reactor) -> None:
        """``postfix start`` (``postfix stop`` in a cleanup of ``case``); fires once it listens."""
        for name in ("transport", "domains"):
            self.postmap(name)
        started = self.command("start")
        case.addCleanup(self.command, "stop")
        if started.returncode != 0:
            raise AssertionError(f"postfix start: {started.stderr}{self.log()}")
        await wait_for_port(reactor, self.port)

    def log(self) -> str:
        try:
            with open(os.path.join(self.tmp, "maillog")) as f:
                return f.read()[-4000:]
        except OSError:
            return ""


@dataclass
class Chain:
    """:func:`start_chain`'s parts: the Postfix, mailrelay's service and its configuration."""

    postfix: PrivatePostfix
    relay: object  # the MultiService of mailrelay.service.makeService
    config: str

    @property
    def registry(self):
        return self.relay.getServiceNamed("mailrelay-stores")._registry

    @property
    def spool(self):
        return self.relay.getServiceNamed("mailrelay-stores")._spool


async def start_chain(
    case, reactor, tmp: str, members_mx, list_address: str, members: list[str]
) -> Chain:
    """Postfix on both sides of an in-process mailrelay, both started.

    The list ``list_address`` (open posting) has ``members``; Postfix routes
    the list's domain to mailrelay over LMTP through the transport map that
    ``mailrelay postfix-maps`` writes, refuses an address not in it, and
    relays mailrelay's copies for ``members.test`` to ``members_mx``.
    """
    postfix = PrivatePostfix(tmp, free_port())
    lmtp_port = free_port()
    config = os.path.join(tmp, "mailrelay.ini")
    with open(config, "w") as f:
        f.write(
            f"[paths]\nvar_dir = {tmp}/var\n[mta]\nlmtp_port = {lmtp_port}\n"
            f"lmtp_hostname = lists.test\nsmtp_host = 127.0.0.1\nsmtp_port = {postfix.port}\n"
        )
    out = io.StringIO()
    for argv in (
        ["lists", "create", list_address, "--owner", "owner@members.test"],
        ["lists", "set", list_address, "posting=open"],  # the poster is no member
        ["members", "add", list_address, *members],
        ["postfix-maps", "-o", os.path.join(postfix.conf, "transport")],
        ["postfix-maps", "--domains", "-o", os.path.join(postfix.conf, "domains")],
    ):
        code = cli.main(["-C", config, *argv], stdout=out, stderr=out)
        if code != 0:
            raise AssertionError(f"mailrelay {' '.join(argv)} exited {code}: {out.getvalue()}")
    with open(os.path.join(postfix.conf, "transport"), "a") as f:
        f.write(f"members.test smtp:[127.0.0.1]:{members_mx.port}\n")

    from mailrelay.config import load_settings
    from mailrelay.service import makeService

    relay = makeService(load_settings(config), reactor)
    relay.startService()
    case.addCleanup(relay.stopService)
    await postfix.start(case, reactor)
    return Chain(postfix, relay, config)


DOVECOT_CONF = """\
# Only the auth service: no mail protocol, nothing outside this directory.
base_dir = {tmp}/run
state_dir = {tmp}/state
log_path = {tmp}/dovecot.log
protocols =
ssl = no
auth_mechanisms = plain login
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {tmp}/passwd
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service auth {{
  unix_listener {socket} {{
    mode = 0660
    user = postfix
    group = postfix
  }}
}}
service anvil {{
  chroot =
}}
"""


def require_dovecot() -> str:
    """Path of ``dovecot``; skip (locally) or fail (CI) without it or without root."""
    path = shutil.which("dovecot") or "/usr/sbin/dovecot"
    if not os.access(path, os.X_OK):
        missing_peer(
            "dovecot is not installed (Debian package dovecot-core); "
            "scripts/test (install_dovecot) installs it"
        )
    if os.geteuid() != 0:
        missing_peer("a private Dovecot must be started as root")
    return path


class PrivateDovecot:
    """A Dovecot auth server under ``tmp`` with ``users`` (name -> password).

    :attr:`socket` is the auth socket for Postfix (``smtpd_sasl_path``),
    owned by the postfix user.  Stopped in a cleanup of ``case``.
    """

    def __init__(self, case, tmp: str, users: dict[str, str]):
        self.tmp = tmp
        os.makedirs(tmp, exist_ok=True)
        os.chmod(tmp, 0o755)  # Postfix's smtpd reaches the socket under it
        self.socket = os.path.join(tmp, "run", "auth-postfix")
        self.conf = os.path.join(tmp, "dovecot.conf")
        passwd = os.path.join(tmp, "passwd")
        with open(passwd, "w") as f:
            # The PLAIN scheme keeps the test readable; an operator uses a hash
            # (doveadm pw -s SHA512-CRYPT).
            f.writelines(f"{user}:{{PLAIN}}{password}\n" for user, password in users.items())
        os.chmod(passwd, 0o640)
        shutil.chown(passwd, group="dovecot")
        with open(self.conf, "w") as f:
            f.write(DOVECOT_CONF.format(tmp=tmp, socket=self.socket))
        self.process: subprocess.Popen | None = None
        case.addCleanup(self.stop)

    async def start(self, reactor) -> None:
        """``dovecot -F -c conf``; fires once the auth socket exists."""
        from tests.daemon import poll

        dovecot = require_dovecot()
        check = subprocess.run(
            [dovecot, "-c", self.conf, "-n"], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise AssertionError(f"dovecot -n -c {self.conf}: {check.stderr}")
        with open(os.path.join(self.tmp, "dovecot.out"), "ab") as out:
            self.process = subprocess.Popen(
                [dovecot, "-F", "-c", self.conf],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

        def listening():
            if self.process.poll() is not None:
                raise AssertionError(f"dovecot exited {self.process.returncode}: {self.log()}")
            return os.path.exists(self.socket)

        await poll(reactor, listening, "Dovecot's auth socket", timeout=15)

    def stop(self) -> None:
        stop_process(self.process)

    def log(self) -> str:
        text = ""
        for name in ("dovecot.out", "dovecot.log"):
            try:
                with open(os.path.join(self.tmp, name)) as f:
                    text += f.read()[-3000:]
            except OSError:
                pass
        return text
