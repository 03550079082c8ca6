"""Root filesystem images: merge verified packages into one normalised tar stream
(tree.py), do what apk's install scripts would have done (configure.py), write ext4 from
the stream (../ext4.py), and publish image, manifest and SBOM (build.py)."""
