"""The offline demo: seeded synthetic scenes (coloured shapes on grey) and the small CLIP trained on them.

``synthetic-tiny`` ships with the package (its open_clip config and weights live here), so the
plugin, the tests and the docs run without downloading anything.
"""

from pathlib import Path

#: The folder holding the demo model's open_clip config (``synthetic-tiny.json``) and weights.
DEMO_DIR = Path(__file__).parent
