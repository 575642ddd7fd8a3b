"""The version of robustlab: the one place it is written.

The build reads it (``[tool.setuptools.dynamic]`` in ``pyproject.toml``) into the wheel's and
the sdist's metadata; ``robustlab.__version__``, ``robustlab --version``, every checkpoint
sidecar (``robustlab_version``) and every result's ``versions["robustlab"]`` read it through
:func:`robustlab._provenance.package_version`. A release changes this line and adds its section
to ``CHANGELOG.md``; ``tests/test_version.py`` checks the two agree.
"""

__version__ = "0.1.0"
