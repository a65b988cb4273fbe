"""Copies of a built engine folder with its JSON record edited (backend load-refusal tests)."""
import json
import shutil


def copy_built(built, dest, record: str, **record_changes):
    """Copy (out_dir, files) into `dest` and apply `record_changes` to the JSON file `record`."""
    out, files = built
    for name in files:
        shutil.copyfile(out / name, dest / name)
    data = json.loads((dest / record).read_text())
    data.update(record_changes)
    (dest / record).write_text(json.dumps(data))
    return dest, files
