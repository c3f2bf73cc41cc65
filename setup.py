"""Package discovery for setuptools (everything else is in pyproject.toml).

`fastprompt/` and its sub-packages are found by `find_packages`, so a new sub-package (as
`fastprompt.original` once was) can never be left out of the wheel. The top-level `kernels/` and
`export/` folders are installed as `fastprompt.kernels` and `fastprompt.export` (with their own
sub-packages, if any): nothing named `kernels` or `export` lands at the top of site-packages.
"""
from setuptools import find_packages, setup

PACKAGE = "fastprompt"
#: folders at the top of the repository installed under the package: folder -> sub-package name
MOUNTED = {"kernels": "kernels", "export": "export"}

packages = [PACKAGE] + [f"{PACKAGE}.{p}" for p in find_packages(PACKAGE)]
package_dir = {PACKAGE: PACKAGE}
for folder, name in MOUNTED.items():
    packages += [f"{PACKAGE}.{name}"] + [f"{PACKAGE}.{name}.{p}" for p in find_packages(folder)]
    package_dir[f"{PACKAGE}.{name}"] = folder

setup(packages=packages, package_dir=package_dir)
