"""`codesign` entry point: subcommands are registered by small modules in this package."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from codesign.errors import CodesignError


def _cmd_targets(args: argparse.Namespace) -> int:
    from codesign.targets import known_targets, llvm_cpus, parse_target

    if args.cpus:
        cpus = llvm_cpus(args.cpus)
        print(json.dumps(list(cpus)) if args.json else "\n".join(cpus))
        return 0
    targets = [parse_target(t) for t in args.target] if args.target else known_targets()
    if args.json:
        print(json.dumps([t.to_dict() for t in targets], indent=2))
        return 0
    for t in targets:
        how = f"RPC key {t.rpc_key} via tracker {t.tracker}" if t.is_remote else "local"
        extra = f", cross compiler {t.cross_cc}" if t.cross_cc else ""
        print(f"{t.spec:<6} key={t.key}  ({how}{extra})")
        print(f"       {t.tvm_json}")
    return 0


def _cmd_spaces(args: argparse.Namespace) -> int:
    from codesign.search.space import get_space, list_spaces

    spaces = [get_space(n) for n in args.space] if args.space else list(list_spaces())
    rows = []
    for s in spaces:
        rows.append(
            {
                "name": s.name,
                "input": list(s.input_shape),
                "layers": s.num_layers,
                "depths": list(s.depths),
                "widths": [st.width for st in s.stages],
                "ops": list(s.ops),
                "distinct_blocks": len(s.blocks()),
                "architectures": s.size(),
                "classes": s.num_classes,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(
            f"{r['name']:<14} input {'x'.join(map(str, r['input']))}, {r['layers']} searchable "
            f"layers (depths {'-'.join(map(str, r['depths']))}, widths "
            f"{'/'.join(map(str, r['widths']))}), {r['distinct_blocks']} distinct blocks, "
            f"{r['architectures']:.3g} architectures"
        )
    return 0


COMMANDS = (
    "lut",
    "latency",
    "farm",
    "artifact",
    "prune",
    "pipeline",
    "search",
    "quantize",
    "compress",
)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default, unless its help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default" in text.lower()
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += _all_parsers(sub)
    return found


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from codesign import __version__

    parser = argparse.ArgumentParser(
        prog="codesign",
        description="Hardware-aware co-design of neural networks on Apache TVM: measure blocks "
        "into a latency table, search and compress under a latency budget, compile and ship.",
    )
    parser.add_argument("--version", action="version", version=f"codesign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("targets", help="list known hardware targets with their TVM target JSON")
    p.add_argument("target", nargs="*", help="target specs to resolve (default: all known)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--cpus",
        choices=("x86", "arm"),
        default=None,
        help="list the mcpu names this TVM's LLVM accepts for the x86 or arm target",
    )
    p.set_defaults(func=_cmd_targets)

    p = sub.add_parser("spaces", help="list registered search spaces")
    p.add_argument("space", nargs="*", help="space names (default: all registered)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_spaces)

    for name in COMMANDS:  # one module per command group, each with register(sub)
        importlib.import_module(f"codesign.cli.{name}").register(sub)
    for p in _all_parsers(parser):
        p.formatter_class = _HelpFormatter
        for action in p._actions:  # options without help text still show their default
            shown = action.default is not None and action.default is not False
            if action.help is None and action.option_strings and shown:
                action.help = "default: %(default)s"
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `codesign argv` (default: sys.argv[1:]) and return its exit code: 0, 2 for bad input
    (the message on stderr), 130 when interrupted. argparse's own exits (usage errors, --help,
    --version) raise SystemExit with their code, as in any argparse program."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from codesign import interrupt

    try:
        with interrupt.handling():
            try:
                return int(args.func(args) or 0)
            except Exception:
                interrupt.check()  # an interrupt that a library turned into an error
                raise
    except CodesignError as err:
        print(f"codesign: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ncodesign: interrupted. Everything measured so far is saved; re-run the same "
            "command to resume.",
            file=sys.stderr,
        )
        return interrupt.EXIT_CODE
    except BrokenPipeError:  # e.g. `codesign lut show | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
