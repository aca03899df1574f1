"""Change the transfer syntax of a dataset with pydicom's pixel codecs (``Transcode`` in a request).

Decoding uses whichever pydicom plugin is installed (gdcm for JPEG, pylibjpeg-openjpeg for JPEG 2000,
pyjpegls for JPEG-LS, pydicom itself for RLE); encoding is limited to what pydicom can encode: RLE Lossless,
JPEG-LS (lossless and near-lossless) and JPEG 2000 (lossless and lossy), plus the uncompressed syntaxes.
Anything else is refused with a message listing what is possible: pydicom has no JPEG baseline encoder.
"""

from __future__ import annotations

import numpy
from pydicom.dataset import Dataset
from pydicom.pixels import get_encoder
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from node.dicom.errors import NotSupported
from node.dicom.fileio import transfer_syntax_of

UNCOMPRESSED = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
ENCODABLE = (RLELossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000)
#: Options for the lossy encoders: JPEG-LS with an error of at most 2, JPEG 2000 at a 10:1 ratio.
LOSSY_OPTIONS = {JPEGLSNearLossless: {"jls_error": 2}, JPEG2000: {"j2k_cr": [10]}}
LOSSY_METHOD = {JPEGLSNearLossless: "ISO_14495_1", JPEG2000: "ISO_15444_1"}
PIXEL_DATA = 0x7FE00010


def supported_targets() -> list[UID]:
    """Transfer syntaxes we can write on this machine (depends on the installed encoders)."""
    out = list(UNCOMPRESSED)
    out += [uid for uid in ENCODABLE if get_encoder(uid).is_available]
    return out


def check_target(target: str) -> None:
    """Refuse a target we cannot write before any instance is touched."""
    if UID(target) not in supported_targets():
        target = UID(target)
        names = ", ".join(f"{u} ({u.name})" for u in supported_targets())
        raise NotSupported(f"cannot transcode to {target} ({target.name or 'unknown transfer syntax'}): "
                           f"no encoder installed; possible targets: {names}")  # fmt: skip


def transcode(ds: Dataset, target: str) -> bool:
    """Re-encode ``ds`` (in place) in ``target``; True when the result is lossy-compressed.

    The SOP Instance UID is left alone: a job keeps the modified one (spec §4.2); the instance-level REST route
    gives a lossy result a new one, as Orthanc does (edge case 48), using the returned flag.

    Raises :class:`~node.dicom.errors.NotSupported` naming the target and what is possible instead.
    """
    target = UID(target)
    source = transfer_syntax_of(ds)
    if target == source:
        return False
    check_target(target)
    try:
        if PIXEL_DATA in ds:
            _encode_pixels(ds, source, target)
        elif target not in UNCOMPRESSED:
            raise NotSupported(f"cannot transcode to {target.name}: the instance has no pixel data")
        ds.file_meta.TransferSyntaxUID = target
    except NotSupported:
        raise
    except Exception as exc:  # noqa: BLE001 - codec plugins raise anything; the message names the cause
        raise NotSupported(f"cannot transcode from {source.name} to {target.name}: {exc}") from None
    if target in LOSSY_METHOD:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = LOSSY_METHOD[target]
        return True
    return False


def _encode_pixels(ds: Dataset, source: UID, target: UID) -> None:
    """Decode the pixels once (any source: compressed, big endian, planar) and encode them for ``target``.

    Working from the decoded array, never from the stored bytes, is what keeps big-endian words and
    planar-configured colour right; a lossless result is decoded again and compared before it is accepted.
    """
    arr = ds.pixel_array  # interleaved samples, YBR converted to RGB; a big-endian source gives a '>' dtype
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    photometric = str(ds.PhotometricInterpretation)
    if photometric.startswith("YBR") and int(ds.get("SamplesPerPixel", 1)) == 3:
        photometric = "RGB"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_pixel_data(arr, photometric, int(ds.BitsStored), generate_instance_uid=False)
    if target in UNCOMPRESSED:
        return
    plugin = "pydicom" if target == RLELossless else ""  # gdcm's RLE encoder aborts the process on some images
    ds.compress(target, arr, encoding_plugin=plugin, generate_instance_uid=False, **LOSSY_OPTIONS.get(target, {}))
    if target not in LOSSY_METHOD and not numpy.array_equal(ds.pixel_array, arr):
        raise NotSupported(f"the {target.name} encoder did not give back the same pixels: refused")
