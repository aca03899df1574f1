"""Pure DICOM logic: identifiers, main tags, (later) anonymization and modification.

Nothing in here touches a database, a socket or global state, so every function is a plain transform that is
trivial to unit-test.
"""
