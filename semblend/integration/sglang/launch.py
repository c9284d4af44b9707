"""``semblend-sglang``: ``python -m sglang.launch_server`` with the SemBlend radix-cache backend selected.

Usage::

    semblend-sglang --model-path Qwen/Qwen2.5-7B-Instruct --port 30000
    semblend-sglang --semblend-config '{"mode": "prefix", "min_similarity": 0.7}' --model-path ...
    semblend-sglang --semblend-config @semblend.json --model-path ...

Every argument but ``--semblend-config`` goes to SGLang unchanged; ``--radix-cache-backend semblend`` is added unless
given. ``--semblend-config`` is exported as ``SEMBLEND_SGLANG_CONFIG`` so SGLang's scheduler processes (which build
the tree cache) read the same configuration; it and the ``SEMBLEND_*`` variables are validated before SGLang starts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from semblend.integration.sglang._config import BACKEND_NAME, CONFIG_ENV, parse_config

_OPTION = "--semblend-config"


def split_args(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``(semblend config option or None, SGLang's arguments with --radix-cache-backend added if missing)``."""
    option: str | None = None
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == _OPTION:
            if i + 1 >= len(args):
                raise SystemExit(f"semblend-sglang: {_OPTION} needs a JSON object or @file")
            option, i = args[i + 1], i + 2
            continue
        if arg.startswith(_OPTION + "="):
            option, i = arg.split("=", 1)[1], i + 1
            continue
        rest.append(arg)
        i += 1
    if not any(a == "--radix-cache-backend" or a.startswith("--radix-cache-backend=") for a in rest):
        rest += ["--radix-cache-backend", BACKEND_NAME]
    return option, rest


def main(argv: Sequence[str] | None = None) -> None:
    option, sglang_args = split_args(sys.argv[1:] if argv is None else argv)
    if option is not None:
        os.environ[CONFIG_ENV] = option
    parse_config()  # a bad key stops here, naming the allowed ones, before any SGLang process starts

    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    from semblend.integration.sglang.factory import register

    load_plugins()
    register()  # also when semblend is not installed as a distribution (no entry point)
    server_args = prepare_server_args(sglang_args)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
