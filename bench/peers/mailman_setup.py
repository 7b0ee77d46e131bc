"""Run inside GNU Mailman 3 (``mailman shell -r mailman_setup.create``): make a
benchmark list that accepts every post without moderation and has N members.

Not imported by mailrelay or its tests: it needs Mailman's own environment.
"""

from __future__ import annotations


def create(list_address: str, member_count: str, domain: str = "members.example") -> None:
    """Create ``list_address`` (if missing) with ``member_count`` members
    ``m<i>@<domain>``, no welcome messages, and posts from anyone accepted."""
    from mailman.app.lifecycle import create_list
    from mailman.config import config
    from mailman.interfaces.action import Action
    from mailman.interfaces.domain import IDomainManager
    from mailman.interfaces.listmanager import IListManager
    from mailman.interfaces.member import MemberRole
    from mailman.interfaces.usermanager import IUserManager
    from zope.component import getUtility

    count = int(member_count)
    mlist = getUtility(IListManager).get(list_address)
    if mlist is None:
        domains = getUtility(IDomainManager)
        list_domain = list_address.rpartition("@")[2]
        if domains.get(list_domain) is None:
            domains.add(list_domain)
        mlist = create_list(list_address)
    mlist.send_welcome_message = False
    mlist.send_goodbye_message = False
    mlist.admin_notify_mchanges = False
    mlist.default_member_action = Action.accept
    mlist.default_nonmember_action = Action.accept
    mlist.require_explicit_destination = False
    mlist.max_message_size = 0
    users = getUtility(IUserManager)
    have = {member.address.email for member in mlist.members.members}
    for i in range(count):
        email = f"m{i}@{domain}"
        if email in have:
            continue
        address = users.get_address(email) or users.create_address(email)
        address.verified_on = address.verified_on or _now()
        mlist.subscribe(address, MemberRole.member, send_welcome_message=False)
        if i % 1000 == 999:
            config.db.commit()
    config.db.commit()
    print(f"{list_address}: {mlist.members.member_count} members")


def _now():
    from mailman.utilities.datetime import now

    return now()
