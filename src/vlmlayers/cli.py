"""``vlmlayers <stage> ...``: every workflow rule runs one of these sub-commands.

Each stage module defines ``add_arguments(parser)`` and ``run(args)``; its docstring is the help.
Modules are imported only when their stage runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

STAGES: dict[str, str] = {
    "world": "vlmlayers.world.scenes",
    "train": "vlmlayers.world.train",
    "compose": "vlmlayers.compose",
    "prepare": "vlmlayers.prepare",
    "evaluate": "vlmlayers.evaluate",
    "extract": "vlmlayers.extract",
    "probe": "vlmlayers.probe",
    "geometry": "vlmlayers.geometry",
    "compare": "vlmlayers.compare",
    "intervene": "vlmlayers.intervene",
    "finetune": "vlmlayers.finetune",
    "plot": "vlmlayers.plots",
    "summary": "vlmlayers.summary",
    "claims": "vlmlayers.claims",
    "check-config": "vlmlayers.config",
    "digest": "vlmlayers.digest",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vlmlayers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    # Build only the requested stage's parser; list the others by name.
    wanted = argv[0] if argv and argv[0] in STAGES else None
    for name, module_name in STAGES.items():
        if name == wanted:
            module = importlib.import_module(module_name)
            doc = (module.__doc__ or "").strip()
            stage = sub.add_parser(
                name,
                help=doc.splitlines()[0] if doc else None,
                description=doc,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            module.add_arguments(stage)
            stage.set_defaults(func=module.run)
        else:
            sub.add_parser(name, help=f"(see vlmlayers {name} --help)")
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
