"""`radixc COMMAND ...`: the command-line entry point. `radixc serve MODEL` runs the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# command -> (module with main(argv) -> int, the extra its imports need)
COMMANDS = {"serve": ("radixc.serve.cli", "serve")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="radixc", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, help="the command's arguments (radixc COMMAND --help)"
    )
    args = parser.parse_args(argv)
    module_name, extra = COMMANDS[args.command]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        parser.exit(
            1, f"radixc {args.command} needs the {extra!r} extra: pip install 'radixc[{extra}]' ({err})\n"
        )
    return module.main(args.args)


if __name__ == "__main__":
    sys.exit(main())
