"""The soak's inputs (tools/quality/soak.py): real chest X-rays, DX DICOMs of them as a cart writes them
(a bed, a made-up patient), C-STORE to the daemon's receiver as a modality sends (retrying while the cart
is down), and the real DICOMs' patient names and IDs that no payload may carry."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from testsupport.dicom_scu import store
from tools.quality.soak_run import Run


def real_images(root: Path, count: int, rng: random.Random) -> list[Path]:
    images = sorted((root / "images").rglob("*.*"))
    if len(images) < count:
        raise SystemExit(f"only {len(images)} images in {root}/images, {count} asked")
    return rng.sample(images, count)


def cart_uid(seed: int, index: int) -> str:
    """The SOP Instance UID of the soak's cart DICOM number `index` (the spool keys it 'sop:<UID>/...')."""
    return str(generate_uid(entropy_srcs=[f"soak/{seed}/{index}"]))


def as_cart_dicom(source: Path, target: Path, bed: str, index: int, seed: int) -> tuple[str, str]:
    """A DX DICOM of the real image, as a cart writes it: the bed in StationName, a (made-up) patient."""
    pixels = np.asarray(Image.open(source).convert("L"))
    patient_name, patient_id = f"SOAK^PATIENT^{seed}X{index:05d}", f"SOAKPID{seed}X{index:05d}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.1.1")  # DX for presentation
    meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(cart_uid(seed, index))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(target), {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"soak-study/{seed}/{index}"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"soak-series/{seed}/{index}"])
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined, ds.StationName = "DX", "PA", "CHEST", bed
    ds.StudyDate, ds.StudyTime = "20261124", f"{index % 24:02d}0000"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    tmp = target.with_name(f".{target.name}.tmp")  # renamed into place, as a modality's C-STORE SCP does
    ds.save_as(tmp, enforce_file_format=True)
    tmp.rename(target)
    return patient_name, patient_id


CSTORE_AE = "SOAK_XRAY"


def cstore(run: Run, path: Path) -> int | None:
    """One C-STORE of `path`: its status, or None when there was no association or no answer."""
    try:
        statuses = store(run.cstore_port, [path], calling=CSTORE_AE)
    except Exception as exc:  # an association torn down by a kill -9 surfaces in several ways
        run.notes_once(f"C-STORE raised {type(exc).__name__} (daemon being killed)")
        return None
    return statuses[0] if statuses else None


def send_until_stored(run: Run, path: Path, patience: float = 90.0) -> bool:
    """What a modality does: send again until the cart answers Success (it may be down for a kill)."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        status = cstore(run, path)
        if status == 0x0000:
            run.cstore_sent += 1
            return True
        run.cstore_retries += 1
        time.sleep(0.5)
    run.notes.append(f"C-STORE of {path.name} not accepted within {patience:.0f} s")
    return False


def real_dicom_secrets(root: Path) -> set[str]:
    out: set[str] = set()
    for path in (root / "dicom").glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out |= {str(v) for v in (ds.get("PatientName"), ds.get("PatientID")) if v not in (None, "")}
    return {s for s in out if len(s) >= 4}  # a 1-3 character "ID" would match any payload by chance
