"""Root filesystem images, one runtime at a time.

Decide (plan.py), merge verified packages into one normalised tar stream (tree.py,
configure.py, stream.py; cached by cache.py, read back by tarwalk.py, a new agent spliced in by
splice.py), write it in each format (../formats/), describe it (manifest.py, sbom.py) and
publish (make.py); build.py is the step."""

# Where things live in every image (named once; configure.py puts them there). Here, not in
# configure.py, so that what only needs the names (a warm rebuild, verify, boot) does not
# import the package merge.
AGENT = "usr/local/bin/vulcan-guest"
OVERLAY_INIT = "etc/vulcan/overlay-init"  # PID 1 of a read-only boot (configure.OVERLAY_INIT_SCRIPT)
