# Device-only workaround (not part of the package): on the lent machine's Python 3.12, datasets' fingerprint
# hashing (dill) fails on pyarrow's MonthDayNano type. Fingerprints are only cache keys: fall back to a random one,
# as datasets itself does when a transform cannot be hashed.
try:
    import uuid

    import datasets.fingerprint as _fp

    _original = _fp.Hasher.hash.__func__

    def _hash(cls, value):
        try:
            return _original(cls, value)
        except Exception:
            return uuid.uuid4().hex

    _fp.Hasher.hash = classmethod(_hash)
except Exception:  # noqa: BLE001
    pass
