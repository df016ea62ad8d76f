"""The bench's inputs (tools/quality/bench.py): how much of everything a run measures, the files per
category (cart DICOMs in each transfer syntax generated from real images, the real DICOMs, real images)
and unique copies of them, since the spool de-duplicates on the SOP Instance UID."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.ingest import sniff
from tools.quality.gen_cart_dicoms import SYNTAXES, frontal_sources, generate, missing_encoders
from tools.training import dataset


@dataclass(frozen=True)
class Plan:
    quick: bool
    sources: int  # real images each syntax is generated from
    repeats: int  # timed repeats per file (in-process stages)
    e2e: int  # files per category through the daemon
    backlog: int
    baseline_backlog: int
    startups: int
    accuracy_images: int

    @staticmethod
    def make(quick: bool, backlog: int | None) -> Plan:
        if quick:
            return Plan(True, 1, 2, 2, backlog or 8, min(backlog or 8, 8), 1, 4)
        n = backlog or 500
        return Plan(False, 4, 5, 20, n, min(n, 100), 3, 48)


@dataclass
class Inputs:
    categories: dict[str, list[Path]]  # syntax or 'real_dicom' / 'real_image' -> files
    missing: dict[str, str]


def prepare_inputs(data: Path, work: Path, plan: Plan) -> Inputs:
    sources = frontal_sources(data, plan.sources)
    made = generate(sources, work / "cart", list(SYNTAXES))
    records = [r for r in dataset.load_records(data) if r.is_cxr and not r.is_dicom]
    images = [data / r.file for r in records[: max(plan.e2e, 3)]]
    categories: dict[str, list[Path]] = {**made}
    categories["real_dicom"] = sorted((data / "dicom").glob("*.dcm"))
    categories["real_image"] = images
    return Inputs(categories, missing_encoders())


class Restamper:
    """Copies of a DICOM under a new SOP Instance UID (the spool de-duplicates on it), by a same-length
    byte substitution in the header: no re-encoding, so making 500 backlog files takes seconds."""

    def __init__(self) -> None:
        self.counter = 0
        self.cache: dict[Path, tuple[bytes, bytes]] = {}

    def bytes_for(self, path: Path) -> bytes:
        if path not in self.cache:
            import pydicom

            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID).encode()
            self.cache[path] = (path.read_bytes(), uid)
        content, uid = self.cache[path]
        last = uid.rsplit(b".", 1)[-1]
        width = min(6, len(last) - 1)
        if width < 3:
            raise ValueError(f"{path.name}: SOP Instance UID {uid.decode()} too short to restamp")
        self.counter += 1
        new = uid[:-width] + str(self.counter % 10**width).zfill(width).encode()
        # Only header occurrences (the pixel data is far beyond the first few kB).
        head = content[:65536].replace(uid, new)
        return head + content[65536:]


def unique_copy(path: Path, restamper: Restamper) -> bytes:
    return restamper.bytes_for(path) if sniff(path) == "dicom" else path.read_bytes()


def backlog_files(inputs: Inputs, n: int) -> list[Path]:
    """The backlog mix: cart DICOMs of every syntax, round robin."""
    pools = [inputs.categories[s] for s in SYNTAXES if s in inputs.categories]
    return [pools[i % len(pools)][(i // len(pools)) % len(pools[i % len(pools)])] for i in range(n)]
