"""Delivering images to hosts through an OCI registry: `publish` (publish.py) and `pull` (pull.py).

What is built goes out as OCI 1.1 artifacts (oci.py: the media types, manifests and indexes),
through the distribution API (client.py: auth, TLS, blobs in chunks, manifests, referrers),
with a signed SLSA provenance attached to every manifest (attest.py); a host pulls one digest,
verifies the signature against the keys it trusts and every blob's digest, and places the files
atomically where `verify` and `boot` find them.
"""
