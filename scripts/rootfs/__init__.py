"""Root filesystem images, one runtime at a time.

Decide (plan.py), merge verified packages into one normalised tar stream (tree.py,
configure.py, stream.py), write it in each format (../formats.py), describe it (manifest.py,
sbom.py) and publish (make.py); build.py is the step."""
