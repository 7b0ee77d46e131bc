"""Packaging entry point for mailrelay (the design card asks for setup.py)."""

from setuptools import find_packages, setup

setup(
    name="mailrelay",
    version="0.1.0.dev0",
    description="A Twisted LMTP-to-SMTP relay for mailing lists",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="GPL-3.0-or-later",
    python_requires=">=3.11",
    # twisted.plugins is a namespace shared with Twisted itself: ship only our
    # plugin module, never an __init__.py (it would shadow Twisted's package).
    packages=find_packages(include=["mailrelay", "mailrelay.*"]) + ["twisted.plugins"],
    package_data={
        "twisted.plugins": ["mailrelay_plugin.py"],
        "mailrelay.listproc": ["templates/*/*.txt"],
    },
    install_requires=[
        "Twisted[tls]>=24.7",
        "pyOpenSSL>=24",
        "service-identity>=24",
        "zope.interface>=6",
        "attrs>=23",
        # Bounce detectors for MTAs that send no RFC 3464 report (Mailman's own).
        "flufl.bounce>=6.0",
        "prometheus_client>=0.17",
    ],
    extras_require={
        # mailrelay.testing's TLS helpers need trustme; embedders install [testing].
        "testing": ["trustme>=1.1"],
        "test": [
            "trustme>=1.1",
            "pytest>=8",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.3",
            "hypothesis>=6",
            "aiosmtpd>=1.4.6",
            "ruff>=0.6",
        ],
    },
    entry_points={"console_scripts": ["mailrelay = mailrelay.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Communications :: Email :: Mailing List Servers",
    ],
)
