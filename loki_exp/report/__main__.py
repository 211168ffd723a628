"""``python -m loki_exp.report``: ``report.command.main``."""

from loki_exp.report.command import main

main()
