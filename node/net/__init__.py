"""DICOM networking with pynetdicom: the SCP that receives into the archive, the SCU that sends from it."""
