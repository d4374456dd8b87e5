"""Batch segmentation on dask.distributed (offline, on the bundled synthetic-tiny model)."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
from skimage.io import imsave

from napari_clearclip.batch import segment_files
from napari_clearclip.demo.scenes import DEMO_CLASSES, make_scene

distributed = pytest.importorskip("distributed", reason="needs the 'distributed' extra")

CLASSES = DEMO_CLASSES.split("\n")
OPTIONS = dict(model="synthetic-tiny", device="cpu")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    for i in range(6):
        imsave(folder / f"scene{i}.png", make_scene(500 + i, size=(160, 224, 288)[i % 3]).image, check_contrast=False)
    stack = np.stack([make_scene(600 + i, size=128).image for i in range(3)])
    tifffile.imwrite(folder / "stack.tif", stack, photometric="rgb")
    (folder / "broken.png").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def sequential(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential")
    reports = segment_files([inputs], CLASSES, out, **OPTIONS)
    assert sorted(r.status for r in reports) == ["done"] * 7 + ["failed"]
    return out


@pytest.fixture
def local_client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def assert_same_outputs(a, b):
    names = sorted(p.name for p in a.glob("*_labels.tif"))
    assert names == sorted(p.name for p in b.glob("*_labels.tif")) and len(names) == 7
    for name in names:
        np.testing.assert_array_equal(tifffile.imread(a / name), tifffile.imread(b / name))
    # the outputs alone: the features cache in that folder is still written by the workers' background writers
    assert not [p for p in b.iterdir() if p.name.endswith(".partial")]
    assert not (b / ".clearclip-parts").exists()


def test_local_cluster_gives_the_sequential_labels_with_one_model_per_worker(inputs, sequential, local_client, tmp_path):
    reports = segment_files([inputs], CLASSES, tmp_path, client=local_client, **OPTIONS)
    assert sorted(r.status for r in reports) == ["done"] * 7 + ["failed"]
    assert_same_outputs(sequential, tmp_path)
    assert tifffile.imread(tmp_path / "stack_labels.tif").shape == (3, 128, 128)
    with open(tmp_path / "clearclip_report.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["status"] for r in rows} == {"done", "failed"}
    assert all(r["worker"].startswith("tcp://") for r in rows if r["status"] == "done")
    assert "broken.png" in [os.path.basename(r["file"]) for r in rows if r["status"] == "failed"][0]
    from napari_clearclip.batch import cluster

    loads = local_client.run(lambda: cluster.LOADS["count"])
    assert sorted(loads.values()) == [1, 1]              # each worker loaded the model once, for all its tasks


def test_a_worker_killed_mid_run_loses_nothing(inputs, sequential, local_client, tmp_path):
    killed = []

    def kill_one(report):
        if not killed:
            import signal

            victim = sorted(local_client.scheduler_info()["workers"])[0]
            pid = local_client.run(os.getpid, workers=[victim])[victim]
            os.kill(pid, signal.SIGKILL)                  # as the out-of-memory killer would
            killed.append(victim)

    reports = segment_files([inputs], CLASSES, tmp_path, client=local_client, on_report=kill_one, **OPTIONS)
    assert killed
    assert sorted(r.status for r in reports) == ["done"] * 7 + ["failed"]
    assert_same_outputs(sequential, tmp_path)


def test_a_resumed_run_recomputes_only_what_is_missing(inputs, sequential, tmp_path):
    import shutil

    for item in sequential.iterdir():
        if item.is_file():
            shutil.copy(item, tmp_path / item.name)
    (tmp_path / "scene3_labels.tif").unlink()
    reports = segment_files([inputs], CLASSES, tmp_path, **OPTIONS)
    done = [r.path.name for r in reports if r.status == "done"]
    assert done == ["scene3.png"]
    assert sum(r.status == "skipped" for r in reports) == 6
    assert_same_outputs(sequential, tmp_path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_on_a_running_scheduler_with_two_workers(inputs, sequential, tmp_path):
    from napari_clearclip.batch.cli import main

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ)
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    processes = [subprocess.Popen([*dask, "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(2):
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--host",
                 "127.0.0.1", "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with distributed.Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        code = main([str(inputs), "--classes", "; ".join(CLASSES), "--out", str(tmp_path), "--model", "synthetic-tiny",
                     "--device", "cpu", "--scheduler", address, "--no-snap"])  # as segment_files' default
        assert code == 1                                  # the broken input
        assert_same_outputs(sequential, tmp_path)
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def test_cluster_needs_the_extra_and_says_which(monkeypatch):
    import builtins

    from napari_clearclip.batch.cluster import DistributedMissingError, require_distributed

    real_import = builtins.__import__

    def no_distributed(name, *args, **kwargs):
        if name == "distributed" or name.startswith("distributed."):
            raise ImportError("No module named 'distributed'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_distributed)
    with pytest.raises(DistributedMissingError, match=r'pip install "napari-clearclip\[distributed\]"') as info:
        require_distributed()
    assert isinstance(info.value, ImportError)


def test_cluster_option_is_checked(capsys, tmp_path):
    from napari_clearclip.batch.cli import main

    assert main([str(tmp_path), "--classes", "red", "--out", str(tmp_path / "o"), "--cluster", "remote:3"]) == 2
    assert "--cluster 'remote:3' is not known" in capsys.readouterr().err


# -- addresses, counts and servers that are not schedulers: fast, typed, never a hang -------------------

def _cli(args, timeout):
    """Run clearclip-segment in its own process, with a hard time limit (a hang fails the test, never blocks it)."""
    command = [sys.executable, "-m", "napari_clearclip.batch.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_weights_a_worker_cannot_download_are_said_in_the_command_lines_options(tmp_path):
    """Offline, weights a cluster's worker cannot download: the same message as without a cluster, not a traceback."""
    imsave(tmp_path / "a.png", np.zeros((32, 32, 3), np.uint8), check_contrast=False)
    for extra in ([], ["--features-only"]):
        done = _cli([str(tmp_path / "a.png"), "--classes", "cell", "--out", str(tmp_path / "o"), "--model", "ViT-B-16",
                     "--pretrained", "openai", "--cluster", "local:1", *extra], timeout=240)
        assert done.returncode == 2, done.stderr[-2000:]
        said = done.stderr.strip().splitlines()[-1]       # (dask's own log of the worker's error comes before)
        assert said.startswith("error: the ViT-B-16 'openai' weights"), done.stderr[-2000:]
        assert "--model ViT-B-16-quickgelu --pretrained FILE" in said and "Segmenter(" not in said
        assert "Traceback (most recent call last)" not in done.stderr, done.stderr[-2000:]


def test_every_error_class_crosses_to_a_dask_client_as_itself():
    """dask pickles a worker's errors with tblib's support installed: each class, message and name comes back."""
    import pickle

    from tblib import pickling_support

    from napari_clearclip import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.ClearClipError)]
    assert errors.WeightsUnavailableError in classes and len(classes) > 5
    for cls in classes:
        error = (cls("the message", "ViT-B-16", "openai") if cls is errors.WeightsUnavailableError
                 else cls("the message"))
        pickling_support.install(error)
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is cls and str(back) == "the message", cls
    back = pickle.loads(pickle.dumps(errors.WeightsUnavailableError("m", "ViT-B-16", "openai")))
    assert (back.model, back.tag) == ("ViT-B-16", "openai")


def test_a_web_server_at_the_scheduler_address_is_refused_in_seconds(tmp_path):
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        image = tmp_path / "a.png"
        imsave(image, make_scene(1, size=96).image, check_contrast=False)
        done = _cli([str(image), "--classes", "red", "--out", str(tmp_path / "o"),
                     "--scheduler", f"tcp://127.0.0.1:{server.server_address[1]}"], timeout=90)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 2, done.stderr
    assert "not a dask scheduler" in done.stderr and "Traceback" not in done.stderr
    assert not list((tmp_path / "o").glob("*_labels.tif"))


def test_more_local_workers_than_the_machine_holds_are_refused_at_once(tmp_path):
    from napari_clearclip.batch.cluster import max_local_workers, parse_cluster

    done = _cli([str(tmp_path), "--classes", "red", "--out", str(tmp_path / "o"), "--cluster", "local:99999"],
                timeout=90)
    assert done.returncode == 2, done.stderr
    assert f"use at most local:{max_local_workers()}" in done.stderr and "Traceback" not in done.stderr
    assert parse_cluster(f"local:{max_local_workers()}") == max_local_workers()


def test_a_closed_port_fails_in_about_a_second_as_a_connection_error():
    from napari_clearclip import ClearClipError
    from napari_clearclip.batch.cluster import start_client

    port = _free_port()                                   # nothing listens there any more
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="Could not reach the dask scheduler") as info:
        start_client(None, f"tcp://127.0.0.1:{port}")
    assert time.perf_counter() - start < 10               # was 20-25 s
    assert isinstance(info.value, ClearClipError)


@pytest.mark.parametrize("cluster, scheduler, message", [
    ("local:0", None, "at least 1"),
    ("gpu:2", None, "is not known"),
    (None, "nonsense", "not a scheduler address"),
    (None, "tcp://127.0.0.1", "not a scheduler address"),
    (None, "http://127.0.0.1:8786", "not a scheduler address"),
])
def test_bad_cluster_and_scheduler_options_are_value_errors(cluster, scheduler, message):
    from napari_clearclip import ClearClipError
    from napari_clearclip.batch.cluster import start_client

    with pytest.raises(ValueError, match=message) as info:
        start_client(cluster, scheduler)
    assert isinstance(info.value, ClearClipError)


def test_a_scheduler_address_without_a_port_is_a_message_not_a_traceback(capsys, tmp_path):
    from napari_clearclip.batch.cli import main

    assert main([str(tmp_path), "--classes", "red", "--out", str(tmp_path / "o"), "--scheduler", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "is not a scheduler address: give it as tcp://HOST:PORT" in err and "Traceback" not in err


def test_results_are_released_as_they_come_so_a_dead_worker_reruns_nothing_finished(inputs, local_client, tmp_path):
    """The scheduler forgets each finished task at once: a worker that dies later makes nothing run
    again (a stack's planes re-run after assembly once left stale parts behind)."""
    held = []

    def count_held(report):
        if report.path.name == "stack.tif":
            deadline = time.monotonic() + 10
            while True:
                keys = local_client.run_on_scheduler(
                    lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks if "stack" in str(k)])
                if not keys or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            held.append(keys)

    reports = segment_files([inputs], CLASSES, tmp_path, client=local_client, on_report=count_held, **OPTIONS)
    assert sorted(r.status for r in reports) == ["done"] * 7 + ["failed"]
    assert held == [[]]
    assert not (tmp_path / ".clearclip-parts").exists()


def test_objects_run_on_the_cluster_as_in_this_process(local_client, tmp_path):
    from skimage.measure import label as connected

    from napari_clearclip.demo.scenes import held_out_scenes

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, scene in enumerate(held_out_scenes(3, sizes=(160,))):
        imsave(inputs / f"s{i}.png", scene.image, check_contrast=False)
        masks = connected(np.any(np.stack(list(scene.masks.values())), axis=0)).astype(np.uint16)
        tifffile.imwrite(inputs / f"s{i}_masks.tif", masks)
    here = segment_files([inputs], CLASSES, tmp_path / "here", objects="_masks", **OPTIONS)
    there = segment_files([inputs], CLASSES, tmp_path / "there", objects="_masks", client=local_client, **OPTIONS)
    assert [r.status for r in here] == [r.status for r in there] == ["done"] * 3
    for i in range(3):
        assert (tmp_path / "here" / f"s{i}_objects.csv").read_text() == (tmp_path / "there" / f"s{i}_objects.csv").read_text()
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "here" / f"s{i}_labels.tif"),
                                      tifffile.imread(tmp_path / "there" / f"s{i}_labels.tif"))


def test_a_lesson_teaches_on_the_cluster_as_in_this_process(local_client, tmp_path):
    from napari_clearclip import Segmenter

    scene = make_scene(3, size=256, objects=(3, 3))
    strokes = np.zeros(scene.image.shape[:2], np.int32)
    strokes[scene.masks["red"]] = 4                                  # red shapes are to be called yellow
    segmenter = Segmenter("synthetic-tiny", device="cpu", disk_cache=False)
    lesson_path = segmenter.make_lesson(CLASSES, [(scene.image, strokes)]).save(tmp_path / "lesson")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        imsave(inputs / f"s{i}.png", make_scene(700 + i, size=192).image, check_contrast=False)
    plain = segment_files([inputs], CLASSES, tmp_path / "plain", **OPTIONS)
    here = segment_files([inputs], CLASSES, tmp_path / "here", lesson=lesson_path, **OPTIONS)
    there = segment_files([inputs], CLASSES, tmp_path / "there", lesson=lesson_path, client=local_client, **OPTIONS)
    assert [r.status for r in plain] == [r.status for r in here] == [r.status for r in there] == ["done"] * 3
    taught = 0
    for i in range(3):
        expected = segmenter.segment(make_scene(700 + i, size=192).image, CLASSES, lesson=lesson_path,
                                     maps=False).labels                 # as the batch runs it: labels alone
        for run in ("here", "there"):
            np.testing.assert_array_equal(tifffile.imread(tmp_path / run / f"s{i}_labels.tif"), expected)
        taught += int((tifffile.imread(tmp_path / "plain" / f"s{i}_labels.tif") != expected).sum())
    assert taught > 0
    # the same folder with another lesson is not this run: its outputs are kept, and said to be another run's
    other = segmenter.make_lesson(CLASSES, [(scene.image, np.where(strokes > 0, 2, 0))]).save(tmp_path / "other")
    again = segment_files([inputs], CLASSES, tmp_path / "here", lesson=other, **OPTIONS)
    assert all(r.status == "skipped" and "other classes, model or options" in r.error for r in again)


def test_features_encoded_on_the_cluster_are_read_by_another_session(local_client, tmp_path, monkeypatch):
    from napari_clearclip import Segmenter
    from napari_clearclip.batch.runs import store_features

    inputs = tmp_path / "in"
    inputs.mkdir()
    images = [make_scene(800 + i, size=160).image for i in range(2)]
    for i, image in enumerate(images):
        imsave(inputs / f"s{i}.png", image, check_contrast=False)
    stack = np.stack([make_scene(810 + i, size=128).image for i in range(2)])
    tifffile.imwrite(inputs / "stack.tif", stack, photometric="rgb")
    reports = store_features([inputs], store=tmp_path / "store", client=local_client, **OPTIONS)
    assert sorted(r.status for r in reports) == ["done"] * 3
    laptop = Segmenter("synthetic-tiny", device="cpu", disk_cache=False, feature_store=tmp_path / "store")

    def refuse(*_):
        raise AssertionError("the image was encoded again")

    monkeypatch.setattr(laptop, "_encode_crops", refuse)
    for image in [*images, *stack]:
        laptop.segment(image, ["red", "background"], maps=False)        # any classes, nothing encoded


def test_clipdiy_with_foreground_maps_runs_on_the_cluster_as_in_this_process(local_client, tmp_path):
    from napari_clearclip.demo.scenes import held_out_scenes

    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, scene in enumerate(held_out_scenes(3, sizes=(160,))):
        imsave(inputs / f"s{i}.png", scene.image, check_contrast=False)
        tifffile.imwrite(inputs / f"s{i}_fg.tif", np.any(np.stack(list(scene.masks.values())), axis=0))
    options = {**OPTIONS, "method": "clipdiy", "foreground": "_fg"}
    here = segment_files([inputs], CLASSES, tmp_path / "here", **options)
    there = segment_files([inputs], CLASSES, tmp_path / "there", client=local_client, **options)
    assert [r.status for r in here] == [r.status for r in there] == ["done"] * 3
    segment_files([inputs], CLASSES, tmp_path / "plain", **{**OPTIONS, "method": "clipdiy"})
    for i in range(3):
        labels = tifffile.imread(tmp_path / "here" / f"s{i}_labels.tif")
        np.testing.assert_array_equal(labels, tifffile.imread(tmp_path / "there" / f"s{i}_labels.tif"))
        assert not np.array_equal(labels, tifffile.imread(tmp_path / "plain" / f"s{i}_labels.tif"))


@pytest.mark.parametrize("stopped_by", ["error", "ctrl+c"])
def test_what_stopped_the_command_is_said_after_its_cluster_closed(tmp_path, capsys, stopped_by):
    """A local cluster's workers log their shutdown on the command's stderr: the command closes its cluster before it
    says the error (or the interruption), so that what the user must read is the last line, and closes it once."""
    from napari_clearclip.batch import cli
    from napari_clearclip.errors import InvalidImageError

    closed = []

    class Closing:
        def __init__(self, name):
            self.name = name

        def close(self):
            closed.append(self.name)
            print(f"distributed.worker - ERROR - {self.name} closed", file=sys.stderr)

    def work():
        if stopped_by == "error":
            raise InvalidImageError("a.png is not an image")
        raise KeyboardInterrupt

    class Bar:
        def close(self):
            pass

    code = cli._finished(work, Bar(), {"client": Closing("client"), "cluster": Closing("cluster")}, tmp_path, None,
                         lambda: "0 finished images are kept")
    said = capsys.readouterr().err.strip().splitlines()
    assert closed == ["client", "cluster"]
    if stopped_by == "error":
        assert code == 2 and said[-1] == "error: a.png is not an image", said
    else:
        assert code == 130 and said[-1].startswith("interrupted: 0 finished images are kept"), said


def test_a_store_at_an_address_is_read_by_the_worker_that_segments_it(local_client, served, tmp_path):
    """A zarr store named by its address (on a server that lists no folder) is read over the network by the worker
    that segments it, whole or tile by tile: its labels equal those of a run in this process, and the engine's."""
    import zarr

    from napari_clearclip import Segmenter

    image = make_scene(700, size=256).image
    array = zarr.create_array(str(tmp_path / "data" / "scene.zarr"), shape=image.shape, chunks=(128, 128, 3),
                              dtype=np.uint8)
    array[:] = image
    address = served(tmp_path / "data", listing=False) + "/scene.zarr"
    engine = Segmenter("synthetic-tiny", device="cpu")
    for output_format, expected in [("tif", engine.segment(image, CLASSES, maps=False).labels),
                                    ("zarr", engine.segment(image, CLASSES, maps=False, short_side=None).labels)]:
        here, there = tmp_path / f"here-{output_format}", tmp_path / f"there-{output_format}"
        local = segment_files([address], CLASSES, here, output_format=output_format, **OPTIONS)
        remote = segment_files([address], CLASSES, there, client=local_client, output_format=output_format, **OPTIONS)
        assert [r.status for r in local] == [r.status for r in remote] == ["done"], (local, remote)
        assert remote[0].worker.startswith("tcp://")
        if output_format == "tif":
            labels = [tifffile.imread(folder / "scene_labels.tif") for folder in (here, there)]
        else:
            labels = [zarr.open_group(str(folder / "scene_labels.zarr"), mode="r")["labels"][:] for folder in (here, there)]
        np.testing.assert_array_equal(labels[0], expected)
        np.testing.assert_array_equal(labels[1], expected)


def test_a_local_clusters_workers_leave_before_its_scheduler_closes(tmp_path):
    """The command's local cluster is closed once its workers have left: a worker whose heartbeat meets a closed
    scheduler prints dask's traceback after the command's last line."""
    from napari_clearclip.batch.cli import _close_started

    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
    client = distributed.Client(cluster)
    assert client.run(os.getpid)                            # a worker is there
    workers_at_close = []
    real_close = cluster.close
    cluster.close = lambda *a, **k: workers_at_close.append(len(cluster.workers)) or real_close(*a, **k)
    started = time.monotonic()
    _close_started({"client": client, "cluster": cluster}, tmp_path)
    assert workers_at_close == [0]
    assert time.monotonic() - started < 30
