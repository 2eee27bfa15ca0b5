"""The SR's character set check (xrwatch.dicom.sr._encodes) writes only the non-ASCII
texts; it must answer as writing the whole data set does."""

from __future__ import annotations

import io
import string
import warnings

import pydicom.charset
import pytest
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from xrwatch.dicom.sr import _encodes


def _full_write_encodes(ds: Dataset) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            ds.save_as(io.BytesIO(), enforce_file_format=False)
        except (UnicodeError, LookupError, UserWarning):
            return False
    return True


def test_every_character_set_pydicom_knows_encodes_printable_ascii() -> None:
    for term, codec in pydicom.charset.python_encoding.items():
        assert string.printable.encode(codec), term


def _ds(
    charset: object, name: str, nested: str = "Model", nested_charset: object = None
) -> Dataset:
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.StudyDescription = "Chest"
    item = Dataset()
    if nested_charset is not None:
        item.SpecificCharacterSet = nested_charset
    item.TextValue = nested
    item.CodeMeaning = "Comment"
    ds.ContentSequence = [item]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # as highdicom writes the SR
    return ds


CASES = {
    "ascii, no set": (None, "Doe^John", "Model", None),
    "latin-1 fits": ("ISO_IR 100", "Buc^Jérôme", "modèle", None),
    "latin-1 without a set": (None, "Buc^Jérôme", "Model", None),  # pydicom's default
    "kanji in latin-1": ("ISO_IR 100", "Yamada^Tarou=山田^太郎", "Model", None),
    "kanji nested in latin-1": ("ISO_IR 100", "Doe^John", "山田", None),
    "ISO 2022 IR 87": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "m", None),
    "unknown set, ascii": ("ISO_IR 999", "Doe^John", "Model", None),
    "utf-8": ("ISO_IR 192", "Hong^Gildong=洪^吉洞=홍^길동", "山田", None),
    "nested own set": ("ISO_IR 100", "Doe^John", "山田", "ISO_IR 192"),
    "nested own set, misfit": ("ISO_IR 192", "Doe^John", "山田", "ISO_IR 100"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_check_answers_as_writing_everything(case: str) -> None:
    ds = _ds(*CASES[case])
    expected = {
        "kanji in latin-1": False,
        "kanji nested in latin-1": False,
        "unknown set, ascii": False,
        "nested own set, misfit": False,
    }.get(case, True)
    assert _full_write_encodes(ds) is expected  # the reference itself, as stated
    assert _encodes(ds) is expected
