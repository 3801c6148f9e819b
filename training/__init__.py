"""batchrl.training (the folder training/ installs under the one import namespace, batchrl)."""
if __name__ != "batchrl.training":  # e.g. `import training` with a checkout on sys.path: one module, one name
    raise ImportError(f"this package is batchrl.training; it was imported as {__name__!r}")
