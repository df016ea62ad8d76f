"""Two processes taking files into one spool at the same instant (the daemon and a USB import): the key is
decided, the file placed and its row written in one write transaction (appliance/ingest/spool_accept.py),
so each distinct image is taken once, no file overwrites another and every offered file is accounted for.
Both offer the same files in the same order from a barrier, so they reach each UID together; which side
wins each one varies from run to run (9/3, 12/0 and 5/7 in three runs here), and the assertions hold for
any interleaving."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from pydicom.uid import generate_uid

from appliance.ingest.spool import Spool
from appliance.ingest.spool_records import Accepted, Duplicate
from tests.ingest.conftest import NATIVE_DX, corrected, real
from testsupport.data import dicom_with

IMAGES = 6  # distinct SOP Instance UIDs; each also comes corrected (same UID, other pixels)


def _admit(
    spool_root: str,
    folder: str,
    start: multiprocessing.synchronize.Barrier,
    out: multiprocessing.Queue[tuple[str, str, str]],
) -> None:
    spool = Spool(Path(spool_root))
    start.wait(timeout=30)
    for path in sorted(Path(folder).iterdir()):
        got = spool.accept(path, Path(folder).name, move=False)  # as a USB import does: the source stays
        verdict = (
            "accepted"
            if isinstance(got, Accepted)
            else "duplicate"
            if isinstance(got, Duplicate)
            else "other"
        )
        out.put((path.name, verdict, getattr(got, "image_id", "")))
    spool.close()


def test_two_processes_admitting_the_same_images_at_once_take_each_once(tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    sources.mkdir()
    originals = [
        dicom_with(real(NATIVE_DX), sources / f"{i}.dcm", {"SOPInstanceUID": generate_uid()})
        for i in range(IMAGES)
    ]
    variants = originals + [corrected(p, sources / f"{p.stem}-fixed.dcm", pixel=True) for p in originals]
    folders = []
    for side in ("daemon", "usb"):
        folder = tmp_path / side
        folder.mkdir()
        for path in variants:
            (folder / path.name).write_bytes(path.read_bytes())
        folders.append(folder)
    root = tmp_path / "spool"
    Spool(root).close()  # created (its key file and database) before the two race for it

    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    out: multiprocessing.Queue[tuple[str, str, str]] = context.Queue()
    workers = [context.Process(target=_admit, args=(str(root), str(f), start, out)) for f in folders]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=120) for _ in range(2 * len(variants))]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    accepted = [r for r in results if r[1] == "accepted"]
    assert {r[1] for r in results} <= {"accepted", "duplicate"}
    # Each distinct image (an original and its corrected re-send) taken exactly once, by one side or the
    # other; the other side's copy is a duplicate of that very id.
    assert sorted(name for name, _, _ in accepted) == sorted(p.name for p in variants)
    ids = {name: image_id for name, _, image_id in accepted}
    for name, _, image_id in results:
        assert image_id == ids[name], name
    spool = Spool(root)
    incoming = sorted(p for p in (root / "incoming").iterdir())
    assert len(incoming) == len(variants) == spool.pending_count()
    by_id = {p.name.split(".", 1)[0]: p.read_bytes() for p in incoming}
    for path in variants:  # no placement overwrote another: each id's file is its own image
        assert by_id[ids[path.name]] == path.read_bytes(), path.name
    spool.close()
