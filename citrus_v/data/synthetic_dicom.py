"""The identifying part of a synthetic DICOM file: file meta, SOP class and instance, study and series, patient."""

from __future__ import annotations

from typing import Any


def synthetic_dataset(sop_class: str, uid_seed: str, modality: str, body_part: str) -> Any:
    """A pydicom ``Dataset`` with its file meta (Explicit VR Little Endian), the instance, study and series UIDs
    drawn from ``uid_seed`` (the same seed gives the same UIDs), a synthetic patient and a fixed date; the
    caller adds the image attributes and pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_instance = generate_uid(entropy_srcs=[uid_seed, "instance"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.PatientName, ds.PatientID = "Synthetic^Phantom", uid_seed[-10:]
    ds.StudyDate = ds.SeriesDate = "20240101"
    ds.Modality, ds.BodyPartExamined = modality, body_part
    return ds
