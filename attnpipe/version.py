"""attnpipe's version, the one place it is written: attnpipe.__version__, the provenance of every
file, and the package metadata (pyproject.toml [tool.setuptools.dynamic]) read it from here."""

__version__ = "0.1.0"
