"""Shared helpers: the tests import the flat scripts from the repository root and write their own tiny data."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # under pytest-xdist (-n auto: a worker per core) torch's thread per core in every worker, and in the scripts
    # the tests start, would make the workers fight over the cores: one thread each keeps them all busy
    os.environ.setdefault("OMP_NUM_THREADS", "1")

CATEGORIES = [{"id": 1, "name": "Paper"}, {"id": 2, "name": "Metal"}, {"id": 3, "name": "Battery"}]


def square(x0, y0, x1, y1):
    """A polygon (flat list) covering pixels x0..x1-1, y0..y1-1 when painted by pycocotools."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def write_set(root, images, annotations, categories=CATEGORIES, name="train_all.json", labeled=True):
    """Write images (list of (file_name, width, height)) as flat grey JPEGs and a COCO JSON; returns its path."""
    root = Path(root)
    entries = []
    for i, (file_name, w, h) in enumerate(images, start=1):
        (root / file_name).parent.mkdir(parents=True, exist_ok=True)
        if not (root / file_name).exists():
            Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(root / file_name)
        entries.append({"id": i, "file_name": file_name, "width": w, "height": h})
    raw = {"images": entries, "categories": categories}
    if labeled:
        raw["annotations"] = [dict({"id": j, "iscrowd": 0}, **a) for j, a in enumerate(annotations, start=1)]
    (root / name).write_text(json.dumps(raw))
    return root / name


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A small synthetic demo set made by data.py itself (12 labeled, 4 unlabeled images)."""
    from demo import make_demo
    return make_demo(tmp_path_factory.mktemp("demo"), num_images=12, num_unlabeled=4, seed=1)


def pytest_collection_modifyitems(items):
    """The README test (every documented command, minutes on its own) first: with -n auto --dist worksteal the other
    worker runs the rest meanwhile and takes over the first one's queue, instead of waiting for it at the end."""
    items.sort(key=lambda item: item.path.name != "test_readme.py")
