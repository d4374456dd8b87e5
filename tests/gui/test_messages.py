"""What the dock says of errors (plain functions: no Qt needed)."""

from __future__ import annotations

import asyncio

from napari_clearclip.errors import InvalidImageError, StoreUnreachableError
from napari_clearclip.gui.messages import error_text


def test_a_network_failure_while_a_remote_image_is_read_is_said_as_one():
    """A remote store's chunks fail to arrive while a run reads them (its reader plugin's dask arrays raise whatever the
    network did): the dock says to check the connection and run again, not "Unexpected error"; an error of ours keeps
    its own words."""
    for failure in (ConnectionResetError("Connection reset by peer"), asyncio.TimeoutError(),
                    ConnectionRefusedError(111, "Connect call failed")):
        text, demo = error_text(failure, "ViT-B-16", "openai")
        assert text.startswith(f"The image could not be read over the network ({type(failure).__name__}") and \
            "Check the connection and press Run again; nothing was changed." in text and not demo, text
    text, _ = error_text(StoreUnreachableError("The zarr store at https://host/a.zarr cannot be read now: x"), "m", "w")
    assert text == "The zarr store at https://host/a.zarr cannot be read now: x"
    assert error_text(InvalidImageError("bad"), "m", "w")[0] == "bad"
    assert error_text(KeyError("x"), "m", "w")[0].startswith("Unexpected error (KeyError")
