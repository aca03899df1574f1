"""Pure DICOM logic: identifiers, main tags, and the de-identification/modification engine.

Nothing in here touches a database, a socket or global state (the only I/O is parsing bytes a caller read), so
every function is a plain transform that is trivial to unit-test. The engine: ``request`` parses an Orthanc
``/anonymize`` or ``/modify`` body, ``apply`` edits a dataset with a ``uidmap`` the caller owns, ``fileio``
reads and writes files without touching pixel data, ``transcode`` changes the transfer syntax.
"""
