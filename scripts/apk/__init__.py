"""Alpine APK packages in pure Python: versions, index, trust, packages, resolution, lock.

Pure logic (version.py, index.py, solver.py, package.py's parsing) is kept apart from I/O:
keys.py (the pinned keys), indexes.py (signed indexes), packages.py (package files) and
lockfile.py (alpine.lock.json), so the logic is tested without network or cache.
"""
