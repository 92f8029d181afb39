"""`awm-fast prompts fetch NAME [NAME ...] | all` and `awm-fast prompts list`: the official prompt sets
(awm_fast.prompt_sets) downloaded at their pinned commits, verified, cached; a config names one as
`official:NAME` (e.g. sample.prompt_file: official:geneval_train). `fetch` prints one line per set: its name and
the cached file. `--base-url` (or $AWM_FAST_PROMPTS_URL) replaces https://raw.githubusercontent.com (a mirror)."""
from __future__ import annotations

import argparse

from awm_fast import prompt_sets
from awm_fast.commands.common import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("prompts", help="the official prompt sets: fetch NAME | all, list",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("fetch", "list"))
    p.add_argument("names", nargs="*", metavar="NAME", help=f"with fetch: {', '.join(prompt_sets.PROMPT_SETS)} or all")
    p.add_argument("--base-url", default=None, help=f"download from this base instead (${prompt_sets.BASE_URL_ENV})")
    p.add_argument("--retries", type=int, default=3, help="retries of a failed download (default %(default)s)")
    p.add_argument("--force", action="store_true", help="download again even when a verified copy is cached")


def run(args) -> int:
    sets = prompt_sets.PROMPT_SETS
    if args.action == "list":
        for name, entry in sets.items():
            path = prompt_sets.cached_path(name)
            state = str(path) if path.is_file() else "not downloaded"
            print(f"{name:16s} {entry.repo}@{entry.commit[:10]}:{entry.path}  {entry.about}  [{state}]")
        return 0
    if not args.names:
        raise UsageError(f"prompts fetch needs a set name: {', '.join(sets)} or all")
    names = list(sets) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in sets]
    if unknown:
        raise UsageError(f"no official prompt set {unknown[0]!r}: one of {', '.join(sets)} or all")
    if args.retries < 0:
        raise UsageError(f"--retries {args.retries} must be >= 0")
    for name in names:
        path = prompt_sets.fetch(name, base_url=args.base_url, retries=args.retries, force=args.force)
        print(f"{name}: {path}", flush=True)
    return 0
