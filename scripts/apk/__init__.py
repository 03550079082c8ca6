"""Alpine APK packages in pure Python: versions, index, trust, packages, resolution, lock.

Pure logic (version.py, index.py, solver.py, package parsing) is kept apart from I/O
(repo.py: the network and the cache), so it is tested without either.
"""
