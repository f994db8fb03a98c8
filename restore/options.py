"""Typed method options: each trainer declares its config keys once, with a type, default and help text.

A trainer lists :class:`Option` entries in an :class:`Options` table; the table builds the yacs
node ``TRAINER.<NAME>`` (:meth:`Options.defaults`), checks a merged node once
(:meth:`Options.validate`: type, allowed values, range, one sentence per problem) and prints its
help. Keys of a sub-node are dotted (``"PROMPTSRC.N_CTX_TEXT"``). A key that was removed is
declared in ``removed`` with the sentence that tells the user what to use instead.

Help for a registered trainer::

    python -m restore.options RESTORE [--plugins trainers]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

__all__ = ["Option", "Options", "main"]


@dataclass(frozen=True)
class Option:
    """One config key of a method.

    Args:
        key: name within the method's node; dotted for a sub-node (``"PROMPTSRC.N_CTX_TEXT"``).
        default: the default value; its type is the key's type (an int is accepted for a float).
        help: one line saying what the key does.
        choices: the allowed values, if only some are.
        minimum / maximum: inclusive bounds for a number.
    """

    key: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None

    @property
    def type(self) -> type:
        return type(self.default)

    def check(self, value: Any, where: str) -> None:
        """Raise a ValueError sentence when ``value`` is not allowed for this key."""
        expected = self.type
        ok = isinstance(value, expected) or (expected is float and isinstance(value, int)) or (
            expected in (list, tuple) and isinstance(value, (list, tuple)))
        if expected is int and isinstance(value, bool):
            ok = False
        if not ok:
            raise ValueError(f"{where} must be a {expected.__name__} ({self.help}), got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{where} must be one of {self.choices}, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{where} must be >= {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{where} must be <= {self.maximum}, got {value!r}")


class Options:
    """A method's option table (see the module docstring); ``a + b`` is ``a`` with ``b``'s keys added or replaced."""

    def __init__(self, *options: Option, removed: dict[str, str] | None = None) -> None:
        keys = [o.key for o in options]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(f"options declared twice: {duplicates}")
        self.options: tuple[Option, ...] = tuple(options)
        self.removed: dict[str, str] = dict(removed or {})

    def __add__(self, other: Options) -> Options:
        own = {o.key for o in other.options}
        return Options(*(o for o in self.options if o.key not in own), *other.options,
                       removed={**self.removed, **other.removed})

    def __iter__(self) -> Iterator[Option]:
        return iter(self.options)

    def defaults(self) -> dict[str, Any]:
        """The nested default values, ready for a yacs node."""
        tree: dict[str, Any] = {}
        for option in self.options:
            *parents, leaf = option.key.split(".")
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = list(option.default) if isinstance(option.default, (list, tuple)) else option.default
        return tree

    def validate(self, node: Any, prefix: str) -> None:
        """Check every declared key of ``node`` (the merged ``prefix`` node); one ValueError sentence."""
        for key, sentence in self.removed.items():
            if _lookup(node, key) is not _MISSING:
                raise ValueError(f"{prefix}.{key} was removed: {sentence}")
        for option in self.options:
            value = _lookup(node, option.key)
            if value is _MISSING:
                raise ValueError(f"{prefix}.{option.key} is missing: add the trainer's keys with "
                                 "restore.engine.config.extend_cfg(cfg) before merging your configs.")
            option.check(value, f"{prefix}.{option.key}")

    def describe(self, prefix: str) -> str:
        """A help table: key, type, default, allowed values and help text, one key per line."""
        lines = []
        for option in self.options:
            allowed = f" {{{', '.join(map(str, option.choices))}}}" if option.choices else ""
            lines.append(f"{prefix}.{option.key} ({option.type.__name__}, default {option.default!r}{allowed}): "
                         f"{option.help}")
        for key, sentence in self.removed.items():
            lines.append(f"{prefix}.{key}: removed. {sentence}")
        return "\n".join(lines)


_MISSING = object()


def _lookup(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return _MISSING
        node = node[part]
    return node


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m restore.options TRAINER [--plugins PKG ...]``: print a trainer's options with their help."""
    from restore.engine.registry import TRAINER_REGISTRY

    parser = argparse.ArgumentParser(prog="python -m restore.options",
                                     description="Print a trainer's config options (TRAINER.<NAME>.*) with help")
    parser.add_argument("trainer", help="registered trainer name")
    parser.add_argument("--plugins", nargs="*", default=["trainers"],
                        help="packages to import first so that they register their trainers (default: trainers)")
    args = parser.parse_args(argv)
    for package in _unique(args.plugins):
        try:
            importlib.import_module(package)
        except ImportError as err:
            print(f"Cannot import {package!r} ({err}); pass --plugins with the package that registers "
                  f"{args.trainer}.", file=sys.stderr)
            return 2
    if args.trainer not in TRAINER_REGISTRY.registered_names():
        known = ", ".join(sorted(TRAINER_REGISTRY.registered_names()))
        print(f"No trainer named {args.trainer!r}; registered: {known}.", file=sys.stderr)
        return 2
    cls = TRAINER_REGISTRY.get(args.trainer)
    table = getattr(cls, "all_options", None)
    if table is None:
        print(f"{args.trainer} declares no typed options (it is not a PromptTrainer).", file=sys.stderr)
        return 2
    print(table().describe(f"TRAINER.{cls.cfg_node_name()}"))
    return 0


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


if __name__ == "__main__":
    raise SystemExit(main())
