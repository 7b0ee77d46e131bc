"""The package layout's rules, checked on the source (README, "Layout").

Imports are read with :mod:`ast`, so the checks see every ``import`` in a
module, including those inside functions (imported lazily to keep the reactor
untouched at import time); circles are looked for among module-level imports
only, which are the ones that run at import time.
"""

from __future__ import annotations

import ast
import importlib
import pathlib

from twisted.trial.unittest import SynchronousTestCase

import mailrelay

_ROOT = pathlib.Path(mailrelay.__file__).parent

# Values, errors and contracts: the floor every other module stands on.
_FOUNDATION = {"mailrelay.model", "mailrelay.errors", "mailrelay.interfaces"}
# Pure helpers that only the foundation may be below.
_PURE = _FOUNDATION | {
    "mailrelay._checks",
    "mailrelay._files",
    "mailrelay.addresses",
    "mailrelay.observer",  # the no-op IRelayObserver every layer may default to
}
# The modules that compose the others, and the command line on top.
_TOP = ("mailrelay.service", "mailrelay.tap", "mailrelay.cli")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports() -> dict[str, tuple[set[str], set[str]]]:
    """Module name -> (every mailrelay module it imports, those imported at module level)."""
    graph: dict[str, tuple[set[str], set[str]]] = {}
    for path in sorted(_ROOT.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        every: set[str] = set()
        top: set[str] = set()
        top_level_nodes = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node, path.name == "__init__.py")
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            names = [n for n in names if n == "mailrelay" or n.startswith("mailrelay.")]
            every.update(names)
            if id(node) in top_level_nodes:
                top.update(names)
        graph[module] = (every, top)
    modules = set(graph)
    # "from mailrelay.x import Name" names a module only when x.Name is one.
    for every, top in graph.values():
        for names in (every, top):
            names.intersection_update(modules)
    return graph


def _within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


class LayoutTests(SynchronousTestCase):
    graph = _imports()

    def imports_of(self, *packages: str) -> dict[str, set[str]]:
        return {m: every for m, (every, _) in self.graph.items() if _within(m, *packages)}

    def assert_only(self, packages: tuple[str, ...], allowed) -> None:
        for module, imported in self.imports_of(*packages).items():
            for name in imported:
                if name != module and not allowed(module, name):
                    self.fail(f"{module} imports {name}, which the layout does not allow")

    def test_no_import_circles(self):
        """No chain of module-level imports leads back to where it started."""
        top = {m: t - {m} for m, (_, t) in self.graph.items()}
        done: set[str] = set()

        def visit(module: str, path: list[str]) -> None:
            if module in path:
                cycle = path[path.index(module) :] + [module]
                # A package re-exporting its own modules is not a circle.
                if not all(_within(m, cycle[0]) or _within(cycle[0], m) for m in cycle):
                    self.fail("import circle: " + " -> ".join(cycle))
                return
            if module in done:
                return
            for name in sorted(top.get(module, ())):
                if not _within(module, name):  # importing one's own package __init__
                    visit(name, path + [module])
            done.add(module)

        for module in sorted(top):
            visit(module, [])

    def test_foundation_imports_nothing_concrete(self):
        """model, errors and interfaces import no other mailrelay module but each other."""
        self.assert_only(tuple(_FOUNDATION), lambda m, name: name in _FOUNDATION)

    def test_storage_imports_values_only(self):
        """The spool and the registry import values, errors, interfaces and pure
        helpers, and their own modules: never policy, delivery or configuration."""
        self.assert_only(
            ("mailrelay.spool", "mailrelay.registry"),
            lambda m, name: name in _PURE or _within(name, "mailrelay.spool"),
        )

    def test_wire_modules_know_no_policy(self):
        """The LMTP and SMTP wire modules import values, errors and addresses, and
        the outbound client its own mta helpers: nothing of policy or storage."""
        self.assert_only(
            ("mailrelay.lmtp.protocol",),
            lambda m, name: name in _PURE or name == "mailrelay.lmtp",
        )
        self.assert_only(
            ("mailrelay.mta.client",),
            lambda m, name: name in _PURE or _within(name, "mailrelay.mta"),
        )

    def test_runner_reaches_storage_through_interfaces(self):
        """No runner module imports a concrete spool or registry, configuration
        or the composing modules."""
        forbidden = ("mailrelay.spool", "mailrelay.registry", "mailrelay.config") + _TOP
        self.assert_only(("mailrelay.runner",), lambda m, name: not _within(name, *forbidden))

    def test_no_upward_imports(self):
        """Only the top floor (service, tap, cli) imports the composing modules,
        and nothing but the command line imports the command line."""
        for module, imported in self.imports_of("mailrelay").items():
            for name in imported:
                if _within(name, "mailrelay.cli"):
                    self.assertTrue(_within(module, "mailrelay.cli"), f"{module} imports {name}")
                elif _within(name, "mailrelay.service", "mailrelay.tap"):
                    self.assertTrue(_within(module, *_TOP), f"{module} imports {name}")

    def test_public_names_import(self):
        """Every package's ``__all__`` names import from the package, as documented."""
        packages = sorted(
            _module_name(p) for p in _ROOT.rglob("__init__.py") if "templates" not in p.parts
        )
        self.assertIn("mailrelay.runner", packages)
        for name in packages:
            package = importlib.import_module(name)
            for public in getattr(package, "__all__", ()):
                with self.subTest(package=name, name=public):
                    self.assertIsNotNone(getattr(package, public))

    def test_documented_names(self):
        """The names README documents for embedders import from where it says."""
        from mailrelay.mta import BulkDelivery, Connection, SecureMode
        from mailrelay.service import makeService
        from mailrelay.testing import FakeMTA
        from mailrelay.testing.lmtp import connect_lmtp

        for value in (BulkDelivery, Connection, SecureMode, makeService, FakeMTA, connect_lmtp):
            self.assertTrue(callable(value) or value is not None)
