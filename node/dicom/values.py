"""Turn a JSON value of a ``Replace`` into a pydicom element, by VR (spec §2.5).

Strings are stored verbatim for text VRs, parsed for numeric VRs and AT; ``null`` gives an empty element; a
list gives a sequence of items (objects of tag: value); ``data:application/octet-stream;base64,…`` gives raw
bytes; ``data:<mime>;base64,…`` on EncapsulatedDocument embeds the document. A value that the dataset's
character set cannot encode is refused rather than silently turned into ``?``.
"""

from __future__ import annotations

import base64
import binascii
import warnings
from typing import Any

from pydicom.charset import convert_encodings, encode_string
from pydicom.datadict import dictionary_has_tag, dictionary_VR, private_dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from node.dicom import tags as tagmod
from node.dicom.errors import BadParameterType, NotSupported, ParameterOutOfRange, UnknownTag

TEXT_VRS = frozenset("AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT".split())
INT_VRS = {"US": (0, 0xFFFF), "SS": (-0x8000, 0x7FFF), "UL": (0, 0xFFFFFFFF), "SL": (-0x80000000, 0x7FFFFFFF),
           "UV": (0, 2**64 - 1), "SV": (-(2**63), 2**63 - 1)}  # fmt: skip
FLOAT_VRS = frozenset(("FL", "FD"))
BINARY_VRS = frozenset(("OB", "OW", "OD", "OF", "OL", "OV", "UN"))
OCTET_STREAM = "data:application/octet-stream;base64,"
ENCAPSULATED_DOCUMENT = 0x00420011
MIME_TYPE_OF_ENCAPSULATED_DOCUMENT = 0x00420012
PIXEL_DATA = 0x7FE00010


def value_text(value: Any) -> str:
    """A decoded value as DICOM text: multiple values joined by backslashes (not a Python list), None empty."""
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def tag_name(tag: int) -> str:
    t = Tag(tag)
    return f"{t.group:04x},{t.element:04x}"


def vr_for(tag: int, existing_vr: str | None, private_creator: str) -> str:
    """The VR to write: the existing element's, else the (private) dictionary's, else UN."""
    if existing_vr and existing_vr != "UN":
        return existing_vr
    t = Tag(tag)
    vr = None
    if t.is_private:
        if t.is_private_creator:
            vr = "LO"
        elif private_creator:
            try:
                vr = private_dictionary_VR(t, private_creator)
            except KeyError:
                vr = None
    elif dictionary_has_tag(t):
        vr = dictionary_VR(t)
    if vr is None:
        return existing_vr or "UN"
    if " or " in vr:  # ambiguous (US or SS, OB or OW): the first is what DCMTK's dictionary says
        vr = vr.split(" or ")[0]
    return vr


def _check_encodable(text: str, tag: int, charset: Any) -> None:
    encodings = convert_encodings(charset or "ISO_IR 6")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encode_string(text, encodings)
    if caught:
        raise ParameterOutOfRange(f"the value for tag {tag_name(tag)} cannot be written in the dataset's "
                                  f"character set {charset or 'ISO_IR 6 (ASCII)'}: {text!r}")  # fmt: skip


def _decode_data_uri(text: str, tag: int) -> tuple[str, bytes]:
    header, sep, payload = text.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ParameterOutOfRange(f"tag {tag_name(tag)}: malformed data URI (expected data:<mime>;base64,…)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ParameterOutOfRange(f"tag {tag_name(tag)}: the data URI is not valid base64") from None
    return header[len("data:") : -len(";base64")], data


def _numbers(text: str, tag: int, vr: str) -> list[Any]:
    parts = text.split("\\")
    try:
        if vr in INT_VRS:
            low, high = INT_VRS[vr]
            values: list[Any] = [int(p.strip(), 10) for p in parts]
            if any(not low <= v <= high for v in values):
                raise ValueError
            return values
        return [float(p) for p in parts]
    except ValueError:
        raise ParameterOutOfRange(f"tag {tag_name(tag)} ({vr}) has out-of-range value {text!r}") from None


def make_element(tag: int, value: Any, *, vr: str, charset: Any, private_creator: str = "") -> DataElement:
    """The element ``tag`` set to the JSON ``value`` (already shape-checked by the request parser)."""
    if isinstance(value, list):
        if vr != "SQ":
            raise BadParameterType(f"tag {tag_name(tag)} is not a sequence (VR {vr}): it cannot take a JSON list")
        return DataElement(tag, "SQ", Sequence([make_item(item, charset, private_creator) for item in value]))
    if value is None:
        return DataElement(tag, vr, Sequence() if vr == "SQ" else None)
    if not isinstance(value, str):
        raise BadParameterType(f"Bad Parameter type for tag {tag_name(tag)}: {type(value).__name__}")
    if value.startswith("data:"):
        mime, data = _decode_data_uri(value, tag)
        if mime == "application/octet-stream":
            return DataElement(tag, vr if vr != "SQ" else "UN", data)
        if tag == ENCAPSULATED_DOCUMENT:
            return DataElement(tag, "OB", data if len(data) % 2 == 0 else data + b"\0")
        if tag == PIXEL_DATA:
            raise NotSupported(f"a {mime} data URI on PixelData needs the whole dataset: use embed_image()")
    if vr == "SQ":
        raise BadParameterType(f"tag {tag_name(tag)} is a sequence: give a JSON list of items, not a string")
    if vr in TEXT_VRS:
        _check_encodable(value, tag, charset)
        return DataElement(tag, vr, value)
    if vr in INT_VRS or vr in FLOAT_VRS:
        numbers = _numbers(value, tag, vr)
        return DataElement(tag, vr, numbers[0] if len(numbers) == 1 else numbers)
    if vr == "AT":
        try:
            tags = [tagmod.parse_tag(p) for p in value.split("\\")]
        except tagmod.TagError as exc:
            raise ParameterOutOfRange(f"tag {tag_name(tag)} (AT): {exc}") from None
        return DataElement(tag, "AT", tags[0] if len(tags) == 1 else tags)
    data = value.encode("utf-8")
    if vr == "OW" and len(data) % 2:
        raise ParameterOutOfRange(f"tag {tag_name(tag)} (OW) needs an even number of bytes, got {len(data)}")
    return DataElement(tag, vr, data)


def make_item(item: Any, charset: Any, private_creator: str) -> Dataset:
    """One sequence item from ``{tagToken: value}`` (``[]`` is an empty item)."""
    ds = Dataset()
    if isinstance(item, list):
        return ds
    for key, sub in item.items():
        try:
            tag: BaseTag = tagmod.parse_tag(key, parentheses=False)
        except tagmod.UnknownTagError as exc:
            raise UnknownTag(str(exc)) from None
        except tagmod.TagError as exc:
            raise ParameterOutOfRange(str(exc)) from None
        if tag.element == 0:
            continue  # group lengths are ignored, as Orthanc does
        ds[tag] = make_element(tag, sub, vr=vr_for(tag, None, private_creator), charset=charset,
                               private_creator=private_creator)  # fmt: skip
    return ds


#: Pillow image modes we can turn into DICOM pixels: (numpy dtype, photometric interpretation, bits stored).
_IMAGE_MODES = {"L": ("uint8", "MONOCHROME2", 8), "I;16": ("uint16", "MONOCHROME2", 16),
                "RGB": ("uint8", "RGB", 8)}  # fmt: skip


def is_image_uri(tag: int, value: Any) -> bool:
    return tag == PIXEL_DATA and isinstance(value, str) and value.startswith("data:image/")


def embed_image(ds: Dataset, uri: str) -> None:
    """``Replace`` of PixelData with ``data:image/png|jpeg;base64,…``: the picture becomes the pixel data, and
    Rows, Columns, photometric interpretation, bits and samples follow it (as Orthanc does)."""
    import io

    import numpy
    from PIL import Image, UnidentifiedImageError
    from pydicom.uid import ExplicitVRLittleEndian

    mime, data = _decode_data_uri(uri, PIXEL_DATA)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise ParameterOutOfRange(f"PixelData: the {mime} data URI is not a readable image: {exc}") from None
    if image.mode not in _IMAGE_MODES:
        image = image.convert("RGB" if image.mode in ("RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV") else "L")
    dtype, photometric, bits = _IMAGE_MODES[image.mode]
    arr = numpy.asarray(image, dtype=dtype)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") is not None and meta.TransferSyntaxUID.is_compressed:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian  # the new pixels are native
    ds.set_pixel_data(arr, photometric, bits, generate_instance_uid=False)
