"""batchrl.serving (the folder serving/ installs under the one import namespace, batchrl)."""
if __name__ != "batchrl.serving":  # e.g. `import serving` with a checkout on sys.path: one module, one name
    raise ImportError(f"this package is batchrl.serving; it was imported as {__name__!r}")
