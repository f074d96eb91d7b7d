"""The `blurbtune` command: train, report, data check, verify."""

from __future__ import annotations

import sys

USAGE = """usage: blurbtune <command> [...]

commands:
  train [hydra overrides]        fine-tune (same as `python train.py ...`)
  report SWEEP [SWEEP ...]       tables and plots of a sweep's runs
  data check [DATA_DIR]          BLURB datasets found under a folder, with their split sizes
  verify RUN_DIR                 re-run a finished run and compare metrics and predictions
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        from blurbtune.train import main as train_main

        sys.argv = [sys.argv[0] + " train", *rest]
        train_main()
        return 0
    if command == "report":
        from blurbtune.report.cli import main as report_main

        return report_main(rest)
    if command == "data":
        from blurbtune.data_check import main as data_main

        return data_main(rest)
    if command == "verify":
        from blurbtune.verify import main as verify_main

        return verify_main(rest)
    print(f"blurbtune: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
