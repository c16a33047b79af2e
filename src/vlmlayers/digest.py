"""Write the content digest of a checkpoint directory to a small file beside it.

Cacheable rules take a checkpoint the workflow makes through this file instead of the directory:
Snakemake's between-workflow cache hashes an input by its bytes wherever it cannot follow the
provenance of the job that made it (in every SLURM job step), and it cannot read a directory.
The digest covers every file's relative name and bytes (hidden files, such as Snakemake's
``.snakemake_timestamp``, left out), so a changed checkpoint is a changed input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlmlayers.io import hash_tree, tree_files, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, help="checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")


def run(args: argparse.Namespace) -> None:
    if not args.directory.is_dir():
        raise FileNotFoundError(f"{args.directory} is not a directory")
    files = tree_files(args.directory)
    if not files:
        raise ValueError(f"{args.directory} holds no files")
    digest = {"sha256": hash_tree(args.directory), "files": len(files)}
    write_json(digest, args.out)
    print(f"{args.directory}: {len(files)} files, sha256 {digest['sha256']}")
