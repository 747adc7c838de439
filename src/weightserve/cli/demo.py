"""`weightserve demo`: serve and fetch a generated tiny Llama (weightserve.demo does the work)."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="serve and fetch a generated tiny Llama, verifying every bit")
    demo.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from weightserve.demo import main as demo_main

    return demo_main()
