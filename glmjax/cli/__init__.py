"""The `glmjax` command line: one module per subcommand, shared plumbing in `common`.

Library packages hold no `main()`: argument parsing and the mapping of errors to
exit codes live here only (see `common` for the exit-code contract).
"""

from glmjax.cli.main import main

__all__ = ["main"]
