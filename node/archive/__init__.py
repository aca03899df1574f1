"""The archive: DICOM files on disk plus a peewee index of them.

``storage`` owns the files, ``models``/``db`` the index, ``store`` the one transaction that makes a received
instance durable in both, ``query`` the read side (stats, lookups) that the REST API and Q/R SCP share.
"""
