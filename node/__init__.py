"""dicom-node: a DICOM network node that archives, de-identifies and forwards images.

The package is layered one way (see README "Architecture"):
``node.dicom`` (pure DICOM logic) <- ``node.archive`` (index + files) <- ``node.net`` (SCP/SCU) <- ``node.cli``.
"""

__version__ = "0.1.0"
