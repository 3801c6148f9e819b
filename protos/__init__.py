"""batchrl.protos (the folder protos/ installs under the one import namespace, batchrl)."""
if __name__ != "batchrl.protos":  # e.g. `import protos` with a checkout on sys.path: one module, one name
    raise ImportError(f"this package is batchrl.protos; it was imported as {__name__!r}")
