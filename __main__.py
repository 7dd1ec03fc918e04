"""`python -m afdserve ...` is the `afdserve` command."""
import sys

from afdserve.engine.cli import main

sys.exit(main())
