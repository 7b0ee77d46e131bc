"""Configuration: one INI file -> validated, frozen :class:`Settings`.

This package's public names, re-exported from the modules that hold them:
:mod:`~mailrelay.config.values` (value parsers), :mod:`~mailrelay.config.endpoints`
(endpoint descriptions), :mod:`~mailrelay.config.schema` (the keys, their
defaults and help) and :mod:`~mailrelay.config.settings` (the settings values,
loading, cross-key checks and :func:`describe_defaults`).
"""

from mailrelay.config.endpoints import ENDPOINT_TYPES
from mailrelay.config.schema import PASSWORD_ENVIRONMENT_VARIABLE
from mailrelay.config.settings import (
    CONFIG_ENVIRONMENT_VARIABLE,
    DevModeSettings,
    MTASettings,
    PathSettings,
    Settings,
    describe_defaults,
    load_settings,
)
from mailrelay.config.values import SECURE_MODES, parse_bool, parse_duration, parse_size

__all__ = [
    "CONFIG_ENVIRONMENT_VARIABLE",
    "ENDPOINT_TYPES",
    "PASSWORD_ENVIRONMENT_VARIABLE",
    "SECURE_MODES",
    "DevModeSettings",
    "MTASettings",
    "PathSettings",
    "Settings",
    "describe_defaults",
    "load_settings",
    "parse_bool",
    "parse_duration",
    "parse_size",
]
