"""mailrelay's test suite (trial and pytest both collect it).

Property tests run on a shared two-core CI machine next to other suites:
Hypothesis' wall-clock checks (deadline, "input generation is slow") measure
the machine's load there, not the code, so the suite's profile turns them
off.  Speed is measured by ``bench/``, never by a test.
"""

from hypothesis import HealthCheck, settings

settings.register_profile("mailrelay", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("mailrelay")
