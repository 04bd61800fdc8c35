"""Package discovery for the two source folders (everything else is in pyproject.toml).

pyproject's ``package-dir`` maps ``minimodels`` to src/minimodels and ``minimodels.kernels`` to
kernels/; setuptools' ``packages.find`` cannot put a prefix before what it finds in a folder,
so the list is built here: every package under src/ and every package under kernels/ (such as
``kernels/attention/``), named ``minimodels.kernels.<name>``. A new subpackage needs no edit.
"""

from setuptools import find_packages, setup

setup(packages=find_packages("src") + ["minimodels.kernels"]
      + [f"minimodels.kernels.{name}" for name in find_packages("kernels")])
