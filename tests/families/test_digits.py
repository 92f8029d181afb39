"""The digits family's cache (awm_fast/families/digits.py): concurrent builders of one folder build it once."""
import json
import threading
import time

from awm_fast.families.digits import cached_folder


def test_concurrent_builders_of_one_folder_build_it_once_and_all_read_it(tmp_path):
    folder, builds, results = tmp_path / "digits" / "base-x", [], []

    def fill(tmp):
        builds.append(threading.get_ident())
        tmp.mkdir(parents=True)
        time.sleep(0.3)  # the others arrive while this build runs
        (tmp / "weights.bin").write_bytes(b"w")
        (tmp / "done.json").write_text(json.dumps({"built_by": len(builds)}))

    threads = [threading.Thread(target=lambda: results.append(cached_folder(folder, fill))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(builds) == 1 and results == [folder] * 3
    assert (folder / "weights.bin").read_bytes() == b"w" and not list(folder.parent.glob("*.tmp*"))


def test_a_failed_build_leaves_no_folder_and_the_next_builder_builds_it(tmp_path):
    folder = tmp_path / "base-y"

    def broken(tmp):
        tmp.mkdir(parents=True)
        (tmp / "half.bin").write_bytes(b"h")
        raise RuntimeError("killed mid-build")

    try:
        cached_folder(folder, broken)
    except RuntimeError:
        pass
    assert not folder.exists()

    def fill(tmp):
        tmp.mkdir(parents=True)
        (tmp / "done.json").write_text("{}")

    assert cached_folder(folder, fill) == folder and (folder / "done.json").is_file()
