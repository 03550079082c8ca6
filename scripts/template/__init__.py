"""Templates: runtimes made from an OCI image instead of Alpine packages.

pins.json names the image (``alpine.runtimes.NAME.image.reference``); the lock records what it
resolves to for each architecture (lock.py). A build fetches and checks the image's documents
and layers (source.py), applies the layers (layers.py), adds Vulcan's part (configure.py) and
writes the same normalised stream as the Alpine path (assemble.py); every step after the stream
(formats, manifest, SBOM from the image's package database: ospackages.py) is the Alpine one.
"""
