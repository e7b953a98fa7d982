"""Evidence: artifacts stored by content hash, understood (JUnit, logs, screenshots), judged.

The gallery's templates and static files live here; its routes are in
``controller/api/gallery.py``.
"""

from pathlib import Path

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
STATIC_DIR = Path(__file__).resolve().parent / "static"
