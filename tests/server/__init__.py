# A package, so that this directory's conftest.py is imported as `server.conftest` and does not replace the
# top-level `conftest` module that other test files import helpers from.
